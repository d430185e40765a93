"""Fine-tuning losses: distillation from the frozen teacher, and the information-bottleneck term.

Distillation: KL between temperature-softened logits (times T^2), or,
for a backbone without a classification head, 1 - cosine similarity of the pooled features.

IB loss (the LTM paper's information-bottleneck term). With soft output clusters phi_out(f, b) =
softmax_b(-beta * ||f/|f| - v_b||^2) and the variational table q(y | b) (class distribution
inside cluster b, estimated from soft counts of phi_out over the training data):

    term_Y = sum_b phi_out(f, b) log q(y | b)       (carries the gradient into f)
    term_X = sum_{a,b} phi_out(f,b) phi_in(x,a) log phi_in(x,a) = -H(phi_in(x))

term_X does not depend on the model's trainable output f once sum_b phi_out = 1, so it has no
gradient: it is computed for logging only. What makes the loss a bottleneck is a compression term
on the model's side, E_x KL(phi_out(f_x) || marginal) >= I(B; X~), weighted by ``compression``;
the loss is ``-mean(term_Y) + compression * KL``. beta (10 by default) makes the cluster
assignments peaked: at beta = 1 their entropy was 4.158 of a maximum ln 64 = 4.159 and the
term's gradient 500 times smaller than the distillation's.

Differences from the public code, on purpose:
- q(y | b) (not p(b | y)) from soft counts; a small Laplace prior keeps empty clusters finite;
- assignments are vectorised with ``torch.cdist`` (no Python loop over centroids);
- centroids are updated by online EMA k-means warm-started from the previous centroids, so
  cluster b keeps meaning the same region of feature space and the table stays aligned with it;
- every statistic (centroid sums, masses, class counts, the initial features) is all-reduced
  across ranks, so every rank holds the same state;
- the feature size and the class count are taken from the data (first batch / dataset).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.metrics import pool_tokens


def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by T^2 (batch mean)."""
    t = float(temperature)
    if t <= 0:
        raise LtmError(f"the distillation temperature must be > 0, got {temperature}")
    s = F.log_softmax(student.float() / t, dim=-1)
    p = F.log_softmax(teacher.float().detach() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def kd_features(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of (pooled) features, averaged over the batch."""
    s, t = pool_tokens(student.float()), pool_tokens(teacher.float().detach())
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def distill(student: torch.Tensor, teacher: torch.Tensor, *, logits: bool, temperature: float = 1.0) -> torch.Tensor:
    return kd_logits(student, teacher, temperature) if logits else kd_features(student, teacher)


# --------------------------------------------------------------------------------------------
# IB loss


def soft_assign(f: torch.Tensor, centroids: torch.Tensor, beta: float) -> torch.Tensor:
    """phi(f, b) = softmax_b(-beta ||f/|f| - v_b||^2): (B, D), (K, D) -> (B, K), vectorised."""
    fn = F.normalize(f.float(), dim=-1)
    d2 = torch.cdist(fn, centroids.float()).pow(2)
    return torch.softmax(-beta * d2, dim=-1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)
    return t


class IBLoss(nn.Module):
    """The IB loss with its running state (centroids, soft class counts) kept in buffers.

    Call :meth:`update` with detached features, inputs and labels of each training batch (it
    all-reduces across ranks), and :meth:`forward` for the loss. Sizes come from the first
    ``update`` (feature sizes) and from ``num_classes`` (the dataset's class count).
    """

    def __init__(self, num_classes: int, clusters: int = 64, beta: float = 10.0, momentum: float = 0.1,
                 count_decay: float = 0.99, prior: float = 1e-2, seed: int = 0, compression: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise LtmError(f"the IB loss needs labelled data with at least 2 classes, got {num_classes}")
        if clusters < 1:
            raise LtmError(f"the IB loss needs at least one cluster, got {clusters}")
        self.num_classes = int(num_classes)
        self.clusters = int(clusters)
        self.beta = float(beta)
        self.compression = float(compression)
        self.momentum = float(momentum)
        self.count_decay = float(count_decay)
        self.prior = float(prior)
        self.seed = int(seed)
        # sizes unknown until data is seen; buffers are (re)shaped on the first update
        self.register_buffer("v_out", torch.zeros(0))
        self.register_buffer("v_in", torch.zeros(0))
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # -- state --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.v_out.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # shapes follow the data
        for name in ("v_out", "v_in", "counts"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_centroids(self, feats: torch.Tensor) -> torch.Tensor:
        """K centroids from the (all-gathered) first batch (farthest points; seeded noise when the batch has fewer than K)."""
        feats = F.normalize(feats.float(), dim=-1)
        gen = torch.Generator().manual_seed(self.seed)
        k, d = self.clusters, feats.shape[1]
        noise = torch.randn(k, d, generator=gen).to(feats.device)
        if feats.shape[0] >= k:  # farthest-point (k-means++-like, deterministic) seeding
            first = int(torch.randint(feats.shape[0], (1,), generator=gen))
            chosen = [first]
            dist = (feats - feats[first]).pow(2).sum(-1)
            for _ in range(k - 1):
                nxt = int(dist.argmax())
                chosen.append(nxt)
                dist = torch.minimum(dist, (feats - feats[nxt]).pow(2).sum(-1))
            base = feats[torch.tensor(chosen, device=feats.device)]
        else:
            reps = feats[torch.arange(k, device=feats.device) % feats.shape[0]]
            base = reps + 0.05 * noise
        return F.normalize(base, dim=-1)

    def q_table(self) -> torch.Tensor:
        """q(y | b): (K, C), rows sum to one, from the soft counts plus a small uniform prior."""
        c = self.counts + self.prior
        return c / c.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def update(self, f: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """One online EMA k-means step for both centroid sets and the soft class counts."""
        f, x = f.detach().float().flatten(1), x.detach().float().flatten(1)
        y = y.to(f.device).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise LtmError(f"label {int(y.max())} is outside 0..{self.num_classes - 1}; the class count does not fit the data")
        if not self.ready:
            self.v_out = self._init_centroids(_all_gather(f))
            self.v_in = self._init_centroids(_all_gather(x))
            self.counts = torch.zeros(self.clusters, self.num_classes, device=f.device)
        if f.shape[1] != self.v_out.shape[1] or x.shape[1] != self.v_in.shape[1]:
            raise LtmError("the IB state was built for other feature sizes; it belongs to another model")
        phi_out = soft_assign(f, self.v_out, self.beta)  # (B, K)
        phi_in = soft_assign(x, self.v_in, self.beta)
        onehot = F.one_hot(y, self.num_classes).float()
        k, do, di = self.clusters, f.shape[1], x.shape[1]
        # one flat buffer -> one all-reduce
        flat = torch.cat([
            (phi_out.t() @ F.normalize(f, dim=-1)).flatten(), phi_out.sum(0),
            (phi_in.t() @ F.normalize(x, dim=-1)).flatten(), phi_in.sum(0),
            (phi_out.t() @ onehot).flatten(),
        ])
        flat = _all_reduce(flat)
        o = 0
        sums_out = flat[o:o + k * do].view(k, do); o += k * do
        mass_out = flat[o:o + k]; o += k
        sums_in = flat[o:o + k * di].view(k, di); o += k * di
        mass_in = flat[o:o + k]; o += k
        counts = flat[o:].view(k, self.num_classes)
        self.v_out = self._step(self.v_out, sums_out, mass_out)
        self.v_in = self._step(self.v_in, sums_in, mass_in)
        self.counts = self.count_decay * self.counts + counts
        self.updates += 1

    def _step(self, v: torch.Tensor, sums: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Move each centroid toward the soft mean of its members (warm start keeps indices aligned)."""
        has = mass > 1e-8
        mean = sums / mass.clamp_min(1e-8).unsqueeze(-1)
        rate = (self.momentum * torch.clamp(mass, max=1.0)).unsqueeze(-1) * has.unsqueeze(-1)
        return F.normalize(v + rate * (mean - v), dim=-1)

    def forward(self, f: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts): loss = prediction + compression * compression_term, differentiable in f.

        prediction = -E[sum_b phi_out(f, b) log q(y | b)], the variational bound on -I(B; Y);
        compression = E_x[KL(phi_out(f_x) || mean_x phi_out)], the variational bound on I(B; X) with the
        global batch's cluster usage (all ranks) as the marginal: the term that makes this a bottleneck (the public
        code's term_X does not depend on the model and carries no gradient; it is logged only).
        """
        if not self.ready:
            raise LtmError("the IB loss has no statistics yet; call update() with a training batch first")
        phi_out = soft_assign(f.flatten(1), self.v_out, self.beta)
        logq = self.q_table().log()  # (K, C)
        prediction = -(phi_out * logq[:, y.long()].t()).sum(-1).mean()
        # the marginal is the global batch's (all ranks): detached, which changes no gradient since
        # d/dm sum_x KL(p_x || m) = -N on every cluster and sum_b dm_b = 0
        with torch.no_grad():
            usage = _all_reduce(torch.cat([phi_out.sum(0), phi_out.new_tensor([phi_out.shape[0]])]))
            marginal = (usage[:-1] / usage[-1].clamp_min(1.0)).unsqueeze(0)
        compression = (phi_out * (phi_out.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(-1).mean()
        with torch.no_grad():
            phi_in = soft_assign(x.detach().flatten(1), self.v_in, self.beta)
            term_x = (phi_in * phi_in.clamp_min(1e-12).log()).sum(-1).mean()
        loss = prediction + self.compression * compression
        return loss, {"ib_prediction": prediction.detach(), "ib_compression": compression.detach(), "ib_term_x": term_x}
