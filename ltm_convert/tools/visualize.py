"""Where did the tokens go?  Merge heat-maps and partitions traced back to the original patches.

Every merging block of a converted model can record what it did (``LtmContext.record``): per
block the chosen ``targets`` (B, M'), the soft merge mask ``assign`` (B, M, M') over the mergeable
tokens, the number of ``prefix`` tokens and the input token sizes ``sizes_in`` (B, M). Any mask
module (LTM, or a baseline from :mod:`ltm_convert.merge.methods`) fills these the same way, so this
module only ever reads ``records``.

The *source map* of block l is ``S^(l) = S^(l-1) A^(l)`` with ``S^(0) = I``: a (B, P, M'_l)
matrix (P original patches x tokens after block l) whose column t says how much of each original
patch ended up in token t. Its entries lie in [0, 1], each row sums to 1 (to 0 for a patch a
pruning method dropped), and column t sums to the size of token t.

Pure computation: :func:`source_maps`, :func:`merge_trace` (tensors in, tensors out).
Running a model: :func:`trace_model`. Drawing (Pillow only): :func:`render`.
One call: :func:`visualize`.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ltm_convert.errors import LtmError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

_REQUIRED = ("targets", "assign", "sizes_in", "prefix")


# ----------------------------------------------------------------------------------------------
# pure computation over records


def _check_records(records: Sequence[dict]) -> None:
    if not records:
        raise LtmError(
            "no merging block recorded anything: the model merges no tokens at this input size "
            "(ratio 1.0, or every block excluded)"
        )
    for i, rec in enumerate(records):
        missing = [k for k in _REQUIRED if rec.get(k) is None]
        if missing:
            name = rec.get("block", f"#{i}")
            raise LtmError(
                f"merging block {name} recorded no {', '.join(repr(k) for k in missing)}: its merge method "
                "does not report a soft assignment, so its merges cannot be visualised"
            )


def source_maps(records: Sequence[dict]) -> list["torch.Tensor"]:
    """``[S^(1), ..., S^(L)]``: per merging block, (B, P, M'_l) float32, original patches x tokens.

    ``S^(0)`` is the identity over the mergeable tokens the first merging block received (the
    original patches); ``S^(l) = S^(l-1) @ assign^(l)``.
    """
    import torch

    _check_records(records)
    maps: list[torch.Tensor] = []
    current = None
    for rec in records:
        assign = rec["assign"].detach().float()
        if assign.dim() != 3:
            raise LtmError(f"block {rec.get('block')}: assign must be (B, M, M'), got shape {tuple(assign.shape)}")
        if current is None:
            b, m, _ = assign.shape
            current = torch.eye(m, device=assign.device).expand(b, m, m)
        if current.shape[-1] != assign.shape[1] or current.shape[0] != assign.shape[0]:
            raise LtmError(
                f"block {rec.get('block')} merged {assign.shape[1]} tokens but the previous block left "
                f"{current.shape[-1]}: the records do not come from one forward pass"
            )
        current = current @ assign
        maps.append(current)
    return maps


@dataclass
class MergeTrace:
    """What one recorded forward did, per merging block, traced back to the original patches.

    blocks: block names, in order. maps: source maps (B, P, M'_l). sizes: (B, M'_l) token sizes
    after each block (= column sums of the map). anchors: (B, M'_l) original patch each token's
    target came from (a target keeps itself, so it has one). targets: the recorded targets
    (indices into that block's input). grid: (rows, cols) of the original patches. prefix: tokens
    in front that never merge. tokens_in: tokens (prefix included) entering each block.
    """

    blocks: list[str]
    maps: list["torch.Tensor"]
    sizes: list["torch.Tensor"]
    anchors: list["torch.Tensor"]
    targets: list["torch.Tensor"]
    grid: tuple[int, int]
    prefix: int
    tokens_in: list[int] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def last_shown(self) -> int:
        """The last merging block that keeps more than one token (the last one if none does)."""
        many = [i for i, sizes in enumerate(self.sizes) if sizes.shape[1] > 1]
        return many[-1] if many else len(self.blocks) - 1

    def index(self, block: int | str | None) -> int:
        """Position of ``block`` among the merging blocks: a name, an int (negative from the end),
        or None (the last one that keeps more than one token: the block before a class-token head
        collapses every patch into one, which shows nothing)."""
        if block is None:
            return self.last_shown()
        if isinstance(block, str) and not block.lstrip("-").isdigit():
            if block not in self.blocks:
                raise LtmError(f"block {block!r} does not merge tokens; merging blocks: {', '.join(self.blocks)}")
            return self.blocks.index(block)
        i = int(block)
        if not -len(self.blocks) <= i < len(self.blocks):
            raise LtmError(f"--block {i} is out of range: the model has {len(self.blocks)} merging blocks "
                           f"(0..{len(self.blocks) - 1}, or negative from the end)")
        return i % len(self.blocks)

    def heatmap(self, block: int | str | None, target: int, image: int = 0) -> "torch.Tensor":
        """(rows, cols) weights in [0, 1]: how much of each original patch went into ``target``."""
        s = self.maps[self.index(block)][image, :, target]
        return s.reshape(self.grid)

    def partition(self, block: int | str | None = None, image: int = 0) -> "torch.Tensor":
        """(rows, cols) long: the token each original patch ended up in after ``block`` (the last
        by default), by largest share; -1 for a patch that was dropped."""
        s = self.maps[self.index(block)][image]
        labels = s.argmax(dim=-1)
        labels[s.sum(dim=-1) <= 1e-6] = -1
        return labels.reshape(self.grid)


def _grid_for(num_patches: int, input_size: tuple[int, int] | None) -> tuple[int, int]:
    if input_size is not None:
        h, w = input_size
        rows = int(round(math.sqrt(num_patches * h / w)))
        for r in (rows, rows - 1, rows + 1):
            if r > 0 and num_patches % r == 0:
                return (r, num_patches // r)
    side = int(round(math.sqrt(num_patches)))
    if side * side == num_patches:
        return (side, side)
    raise LtmError(f"cannot lay {num_patches} tokens out as a patch grid; pass grid=(rows, cols)")


def merge_trace(records: Sequence[dict], grid: tuple[int, int] | None = None,
                input_size: tuple[int, int] | None = None) -> MergeTrace:
    """Source maps, sizes and target anchors for a list of records (a pure function)."""
    import torch

    maps = source_maps(records)
    p = maps[0].shape[1]
    grid = tuple(grid) if grid is not None else _grid_for(p, input_size)  # type: ignore[assignment]
    if grid[0] * grid[1] != p:
        raise LtmError(f"grid {grid} does not hold the {p} mergeable tokens of the first merging block")
    anchors, targets, sizes = [], [], []
    anchor = torch.arange(p, device=maps[0].device).expand(maps[0].shape[0], p)
    for rec, s in zip(records, maps):
        t = rec["targets"].detach().long().to(anchor.device)
        anchor = anchor.gather(1, t)
        anchors.append(anchor)
        targets.append(t)
        sizes.append(s.sum(dim=1))
    return MergeTrace(
        blocks=[str(r.get("block", f"#{i}")) for i, r in enumerate(records)],
        maps=maps, sizes=sizes, anchors=anchors, targets=targets, grid=grid,  # type: ignore[arg-type]
        prefix=int(records[0]["prefix"]), tokens_in=[int(r.get("tokens_in", 0)) for r in records],
    )


# ----------------------------------------------------------------------------------------------
# running a model


def _check(model: "nn.Module") -> None:
    from ltm_convert.api import is_converted
    from ltm_convert.model_inputs import input_frames

    plan = getattr(model, "ltm_plan", None)
    if not is_converted(model) or plan is None:
        raise LtmError("visualisation needs a converted model; call ltm_convert.convert(model, ratio) first")
    if plan.family != "sequence":
        raise LtmError(f"visualize draws plain-sequence ViTs; {plan.model_class} merges on 2-D patch grids "
                       "(MobileViT, Swin, EfficientViT), which it cannot draw yet")
    if input_frames(model) is not None:
        raise LtmError(f"visualize draws merges on one image; {plan.model_class} takes video clips, whose merges "
                       "across frames it cannot draw yet")


def trace_model(model: "nn.Module", images: "torch.Tensor", grid: tuple[int, int] | None = None) -> MergeTrace:
    """Run ``model`` on a normalised batch with recording on and trace its merges."""
    import torch

    from ltm_convert.merge.state import recording
    from ltm_convert.model_inputs import run_model

    _check(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recording() as records:
            run_model(model, images)
    finally:
        model.train(was_training)
    return merge_trace(records, grid=grid, input_size=tuple(images.shape[-2:]))


def prepare(images: Sequence[Any], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
            ) -> tuple["torch.Tensor", list["Image.Image"]]:
    """The model's input (images.py: cover ``size``, centre-crop, normalise) and, for the
    panels, the same crops as pictures."""
    import numpy as np
    import torch
    from PIL import Image

    from ltm_convert.images import normalise, resize_crop, to_tensor

    crops, tensors = [], []
    for item in images:
        t = resize_crop(to_tensor(item), size)
        crops.append(Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)))
        tensors.append(normalise(t, mean, std))
    return torch.stack(tensors), crops


# ----------------------------------------------------------------------------------------------
# drawing (Pillow only)

# viridis, sampled every 1/8 (matplotlib's table); interpolated linearly in between
_VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
            (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)]
_HIGHLIGHT = [(255, 64, 64), (64, 160, 255), (255, 190, 0), (0, 220, 120), (230, 80, 255),
              (255, 130, 40), (0, 230, 230), (255, 255, 255)]


def colormap(values: "np.ndarray") -> "np.ndarray":
    """Values in [0, 1] -> uint8 RGB (viridis)."""
    import numpy as np

    lut = np.asarray(_VIRIDIS, dtype=np.float32)
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(lut) - 1)
    lo = np.floor(v).astype(int).clip(0, len(lut) - 2)
    frac = (v - lo)[..., None]
    return (lut[lo] * (1 - frac) + lut[lo + 1] * frac).round().astype(np.uint8)


def _palette(n: int) -> "np.ndarray":
    """n well-separated colours (golden-ratio hues, alternating brightness)."""
    import numpy as np

    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i // 3) % 2)
        v = 0.95 - 0.25 * (i % 2)
        out.append([round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(out, dtype=np.uint8).reshape(-1, 3)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _upsample(grid_values: "np.ndarray", size: tuple[int, int]) -> "np.ndarray":
    """(rows, cols[, C]) -> (H, W[, C]) by nearest neighbour, every patch a block of pixels."""
    import numpy as np

    rows, cols = grid_values.shape[:2]
    h, w = size
    ri = np.minimum((np.arange(h) * rows) // h, rows - 1)
    ci = np.minimum((np.arange(w) * cols) // w, cols - 1)
    return grid_values[ri][:, ci]


def _cell(r: int, c: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = size
    rows, cols = grid
    return (c * w // cols, r * h // rows, (c + 1) * w // cols - 1, (r + 1) * h // rows - 1)


def _heat_panel(weights: "np.ndarray", crop: "Image.Image", anchor: int, grid: tuple[int, int],
                colour: tuple[int, int, int]) -> "Image.Image":
    import numpy as np
    from PIL import Image, ImageDraw

    size = (crop.height, crop.width)
    heat = _upsample(colormap(weights), size).astype(np.float32)
    grey = np.asarray(crop.convert("L"), dtype=np.float32)[..., None]
    panel = Image.fromarray((0.72 * heat + 0.28 * grey).round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    r, c = divmod(anchor, grid[1])
    draw.rectangle(_cell(r, c, grid, size), outline=colour, width=2)
    return panel


def _targets_panel(crop: "Image.Image", anchors: Sequence[int], shown: Sequence[int], grid: tuple[int, int]
                   ) -> "Image.Image":
    from PIL import ImageDraw

    panel = crop.copy()
    draw = ImageDraw.Draw(panel)
    size = (crop.height, crop.width)
    for a in anchors:
        r, c = divmod(int(a), grid[1])
        draw.rectangle(_cell(r, c, grid, size), outline=(255, 255, 255), width=1)
    for k, a in enumerate(shown):
        r, c = divmod(int(a), grid[1])
        draw.rectangle(_cell(r, c, grid, size), outline=_HIGHLIGHT[k % len(_HIGHLIGHT)], width=3)
    return panel


def _partition_panel(labels: "np.ndarray", crop: "Image.Image", grid: tuple[int, int]) -> "Image.Image":
    import numpy as np
    from PIL import Image, ImageDraw

    n = int(labels.max()) + 1 if labels.size else 1
    # colour tokens in order of first appearance so neighbouring regions rarely share a hue
    order = {}
    for v in labels.ravel():
        if v >= 0 and int(v) not in order:
            order[int(v)] = len(order)
    pal = _palette(max(n, 1))
    colours = np.zeros(labels.shape + (3,), dtype=np.uint8)
    for v, i in order.items():
        colours[labels == v] = pal[i]
    colours[labels < 0] = (40, 40, 40)
    size = (crop.height, crop.width)
    img = np.asarray(crop, dtype=np.float32)
    panel = Image.fromarray((0.65 * _upsample(colours, size) + 0.35 * img).round().astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    rows, cols = grid
    for r in range(rows):  # region borders
        for c in range(cols):
            x0, y0, x1, y1 = _cell(r, c, grid, size)
            if c + 1 < cols and labels[r, c] != labels[r, c + 1]:
                draw.line([(x1, y0), (x1, y1)], fill=(0, 0, 0), width=1)
            if r + 1 < rows and labels[r, c] != labels[r + 1, c]:
                draw.line([(x0, y1), (x1, y1)], fill=(0, 0, 0), width=1)
    return panel


def _colour_bar(height: int, font) -> "Image.Image":
    import numpy as np
    from PIL import Image, ImageDraw

    bar_w, label_w = 14, 30
    bar = colormap(np.linspace(1.0, 0.0, height))[:, None, :].repeat(bar_w, axis=1)
    out = Image.new("RGB", (bar_w + label_w + 4, height), (255, 255, 255))
    out.paste(Image.fromarray(bar), (2, 0))
    draw = ImageDraw.Draw(out)
    for v in (1.0, 0.5, 0.0):
        y = int(round((1 - v) * (height - 1)))
        draw.line([(bar_w + 2, y), (bar_w + 5, y)], fill=(0, 0, 0))
        draw.text((bar_w + 7, min(max(y - 6, 0), height - 13)), f"{v:g}", fill=(0, 0, 0), font=font)
    return out


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def pick_targets(trace: MergeTrace, block: int | str | None, k: int, image: int = 0) -> list[int]:
    """The ``k`` targets of ``block`` that absorbed the most (largest size), in token order."""
    sizes = trace.sizes[trace.index(block)][image]
    k = max(0, min(int(k), sizes.shape[0]))
    idx = sizes.topk(k).indices.tolist() if k else []
    return sorted(idx, key=lambda t: (-float(sizes[t]), t))


def render(trace: MergeTrace, crops: Sequence["Image.Image"], *, block: int | str | None = None,
           targets: int = 4, title: str | None = None, panel: int | None = None) -> "Image.Image":
    """One row per image: the image with ``block``'s targets boxed (the shown ones in colour), one
    heat-map per shown target (its column of the source map, 0..1), and the partition after the
    last merging block; a 0..1 colour bar at the end of each row."""
    from PIL import Image, ImageDraw

    li = trace.index(block)
    name = trace.blocks[li]
    font, small = _font(14), _font(12)
    if not crops:
        raise LtmError("no images to draw")
    if panel is not None and panel != crops[0].width:
        scale = panel / crops[0].width
        crops = [c.resize((panel, max(1, round(c.height * scale))), Image.BICUBIC) for c in crops]
    pw, ph = crops[0].size
    pad, title_h, label_h = 6, (24 if title else 0), 34
    k = max(0, int(targets))
    n_panels = 2 + min(k, trace.sizes[li].shape[1])
    bar = _colour_bar(ph, small)
    width = pad + n_panels * (pw + pad) + bar.width + pad
    if title:  # never cut the title off (small panels)
        width = max(width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 2 * pad)
    height = title_h + len(crops) * (label_h + ph + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 5), title, fill=(0, 0, 0), font=font)
    last = trace.last_shown()
    for i, crop in enumerate(crops):
        y = title_h + i * (label_h + ph + pad) + pad
        shown = pick_targets(trace, li, k, i)
        anchors = trace.anchors[li][i].tolist()
        m_in = trace.tokens_in[li] - trace.prefix if trace.tokens_in and trace.tokens_in[li] else None
        keep = trace.sizes[li].shape[1]
        black = (0, 0, 0)
        panels = [(_targets_panel(crop, anchors, [anchors[t] for t in shown], trace.grid),
                   f"{name}: {keep} targets", f"of {m_in} tokens" if m_in else "", black)]
        for j, t in enumerate(shown):
            w = trace.heatmap(li, t, i).cpu().numpy()
            size = float(trace.sizes[li][i, t])
            colour = _HIGHLIGHT[j % len(_HIGHLIGHT)]
            panels.append((_heat_panel(w, crop, anchors[t], trace.grid, colour), f"target {t}",
                           f"size {size:.1f}, max {w.max():.2f}", tuple(max(0, v - 70) for v in colour)))
        labels = trace.partition(last, i).cpu().numpy()
        kept = int(trace.sizes[last].shape[1])
        panels.append((_partition_panel(labels, crop, trace.grid), f"partition after {trace.blocks[last]}",
                       f"{kept} tokens (+{trace.prefix} prefix)", black))
        x = pad
        for img, line1, line2, colour in panels:
            draw.text((x, y), _fit(draw, line1, small, pw), fill=colour, font=small)
            draw.text((x, y + 15), _fit(draw, line2, small, pw), fill=(90, 90, 90), font=small)
            canvas.paste(img, (x, y + label_h))
            x += pw + pad
        canvas.paste(bar, (x, y + label_h))
    return canvas


# ----------------------------------------------------------------------------------------------
# one call


def visualize(model: "nn.Module", images: Sequence[Any], *, block: int | str | None = None, targets: int = 4,
              input_size: tuple[int, int] | None = None, title: str | None = None,
              panel: int | None = None) -> tuple["Image.Image", MergeTrace]:
    """Render the merges a converted model makes on ``images`` (paths, PIL images or arrays).

    Images are resized to cover the model's conversion resolution, centre-cropped and normalised
    with the model's mean/std (ImageNet's when unknown). Returns (the figure, the trace) so
    callers can check the numbers behind the picture.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    config = getattr(model, "ltm_config", None)
    _check(model)
    size = tuple(input_size or (config.input_size if config is not None else (224, 224)))
    from ltm_convert.images import normalisation

    mean, std = normalisation(model)
    batch, crops = prepare(images, size, mean, std)  # type: ignore[arg-type]
    trace = trace_model(model, batch)
    if title is None and config is not None:
        title = (f"{type(model).__name__}, method {config.method}, FLOPs ratio {config.ratio:g}, "
                 f"{size[0]}x{size[1]}: merges of {trace.blocks[trace.index(block)]}")
    return render(trace, crops, block=block, targets=targets, title=title, panel=panel), trace


def save_png(image: "Image.Image", path: str | Path) -> Path:
    """Write ``image`` as an optimised PNG (creates the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path
