"""Models by name: ``timm.create_model("ltm_<name>")`` and ``ltm_convert.create_model`` give converted
models that save, load, inspect and count FLOPs like any converted model, and ``import ltm_convert``
stays light (the names reach timm's registry only when timm is imported, in either order)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from model_zoo import hf_model
from test_cli import _env, assert_one_line_error, ok

import ltm_convert
from ltm_convert import LtmError
from ltm_convert.io import read_file

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=64, patch_size=8, depth=3, num_classes=5)  # 64 tokens: ratio 0.8 is reachable
VIT = "vit_tiny_patch16_224"


def _flops_ratio(model: torch.nn.Module, base_name: str, **kwargs) -> float:
    base = timm.create_model(base_name, **kwargs)
    return ltm_convert.count_flops(model) / ltm_convert.count_flops(base)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# the check each import order runs in a fresh process: ltm_convert's import alone pulls in neither torch nor
# timm, and once both are imported timm knows the names, builds the converted model, and keeps its own loader
_ORDER_CHECK = """
import json, sys
first = sys.argv[1]
if first == "ltm_convert":
    import ltm_convert
    assert not {"torch", "timm", "transformers"} & set(sys.modules), "import ltm_convert imported torch or timm"
    import timm
else:
    import timm
    import ltm_convert
model = timm.create_model("ltm_vit_tiny_patch16_224", ratio=0.8, img_size=64, patch_size=8, depth=3,
                          num_classes=5, drop_path_rate=0.1)
base = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=3, num_classes=5)
print(json.dumps({
    "class": type(model).__name__, "training": model.training, "ratio": model.ltm_config.ratio,
    "flops": ltm_convert.count_flops(model) / ltm_convert.count_flops(base),
    "source": model.ltm_source.to_dict(), "is_model": timm.is_model("ltm_vit_tiny_patch16_224.augreg_in21k"),
    "listed": len(timm.list_models("ltm_*")), "all": len(timm.list_models(exclude_filters="ltm_*")),
    "pretrained": timm.is_model_pretrained("ltm_vit_tiny_patch16_224.augreg_in21k"),
    "loader": type(timm.__loader__).__name__, "finders": [type(f).__name__ for f in sys.meta_path],
}))
"""


def test_timm_create_model_in_both_import_orders(tmp_path: Path) -> None:
    env = _env(OMP_NUM_THREADS="1")
    procs = {first: subprocess.Popen([sys.executable, "-c", _ORDER_CHECK, first], cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for first in ("ltm_convert", "timm")}
    for first, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{first} first:\n{out}\n{err}"
        got = json.loads(out.strip().splitlines()[-1])
        assert got["class"] == "VisionTransformer" and got["training"] is True  # timm hands back train mode
        assert got["ratio"] == 0.8 and abs(got["flops"] - 0.8) < 0.01, got
        assert got["source"]["name"] == VIT and got["source"]["kwargs"] == {**TINY, "drop_path_rate": 0.1}
        assert got["is_model"] and got["pretrained"] and got["listed"] == got["all"] > 1000, got
        assert got["loader"] == "SourceFileLoader" and "_TimmFinder" not in got["finders"], got


def test_flops_save_load_round_trip(tmp_path: Path) -> None:
    model = timm.create_model(f"ltm_{VIT}", ratio=0.8, **TINY).eval()
    assert ltm_convert.api.is_converted(model)
    assert _flops_ratio(model, VIT, **TINY) == pytest.approx(0.8, abs=0.01)
    x = torch.randn(2, 3, 64, 64)
    for path in (tmp_path / "m.pt", tmp_path / "m_dir"):
        ltm_convert.save(model, path)
        recipe, _ = read_file(path)  # the file names the real timm model and its options
        assert recipe["source"]["kind"] == "timm" and recipe["source"]["name"] == VIT, recipe["source"]
        assert recipe["source"]["kwargs"] == TINY and recipe["config"]["ratio"] == 0.8
        loaded = ltm_convert.load(path)
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))
    recipe = json.loads((tmp_path / "m_dir" / "ltm_config.json").read_text())
    recipe["source"]["name"] = f"ltm_{VIT}"  # a file must name the model that is converted, never its LTM version
    (tmp_path / "m_dir" / "ltm_config.json").write_text(json.dumps(recipe))
    with pytest.raises(LtmError) as e:
        ltm_convert.load(tmp_path / "m_dir")
    assert f"names ltm_{VIT}, an LTM model" in _one_line(e) and "corrupt" in str(e.value)


def test_convert_options_tags_and_the_paper_spelling() -> None:
    model = timm.create_model(f"ltm_{VIT}.augreg_in21k", compression_ratio=0.65, method="tome", topk=0,
                              img_size=64, patch_size=8, depth=3)
    assert model.ltm_config.ratio == 0.65 and model.ltm_config.method == "tome"
    assert model.ltm_source.name == f"{VIT}.augreg_in21k" and model.num_classes == 21843  # the tag's head
    assert _flops_ratio(model, f"{VIT}.augreg_in21k", img_size=64, patch_size=8, depth=3) == pytest.approx(0.65, abs=0.02)
    same = ltm_convert.create_model(VIT, ratio=0.8, **TINY)  # with or without the prefix
    assert ltm_convert.create_model(f"ltm_{VIT}", **TINY).ltm_config.keep == same.ltm_config.keep  # default 0.8
    assert not same.training and same.ltm_source.name == VIT


def test_mobilevit_by_name(tmp_path: Path) -> None:
    model = timm.create_model("ltm_mobilevit_xxs", img_size=96, num_classes=5).eval()  # converted at 96 px
    assert model.ltm_config.input_size == (96, 96)
    base = timm.create_model("mobilevit_xxs", num_classes=5)
    flops = ltm_convert.count_flops(model, (96, 96)) / ltm_convert.count_flops(base, (96, 96))
    assert flops == pytest.approx(0.8, abs=0.01)
    loaded = ltm_convert.load(ltm_convert.save(model, tmp_path / "mv.pt"))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_inspect_and_convert_through_the_cli(tmp_path: Path) -> None:
    path = ltm_convert.save(timm.create_model(f"ltm_{VIT}", **TINY), tmp_path / "m.pt")
    kwargs = [a for k, v in TINY.items() for a in ("--model-kwargs", f"{k}={v}")]
    runs = (["inspect", str(path), "--json"], ["inspect", f"ltm_{VIT}", "--no-pretrained", *kwargs, "--json"],
            ["inspect", "ltm_no_such_model", "--no-pretrained"])
    procs = [subprocess.Popen([sys.executable, "-m", "ltm_convert.cli", *args], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in runs]
    outputs = [p.communicate(timeout=300) for p in procs]
    done = [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
    for proc in done[:2]:  # the saved file, and the name converted in memory
        info = json.loads(ok(proc).stdout)
        assert info["source"]["name"] == VIT and info["source"]["kwargs"] == TINY, info["source"]
        assert info["flops_ratio"] == pytest.approx(0.8, abs=0.01) and info["blocks"], info
    assert "unknown model 'ltm_no_such_model'" in assert_one_line_error(done[2])


def test_pretrained_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ltm_convert.sources import build

    monkeypatch.setattr(build, "_hub_reachable", lambda: False)  # offline even where a network exists
    for make in (lambda: timm.create_model(f"ltm_{VIT}", pretrained=True),
                 lambda: ltm_convert.create_model(VIT, pretrained=True)):
        start = time.time()
        with pytest.raises(LtmError) as e:
            make()
        assert time.time() - start < 20
        msg = _one_line(e)
        assert f"could not download pretrained weights for {VIT}" in msg and "--checkpoint" in msg, msg


def test_hf_models_by_path_and_by_config(tmp_path: Path) -> None:
    original = hf_model("ViTForImageClassification")
    original.save_pretrained(tmp_path / "vit")
    x = torch.randn(1, 3, 64, 64)
    same = ltm_convert.create_model(f"hf:{tmp_path / 'vit'}", ratio=1.0, pretrained=True)  # the directory's weights
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)
    model = ltm_convert.create_model(tmp_path / "vit", ratio=0.8, num_labels=3)  # a Path; random weights
    assert model.config.num_labels == 3 and model.ltm_source.kwargs == {"num_labels": 3}
    assert ltm_convert.count_flops(model) / ltm_convert.count_flops(original) == pytest.approx(0.8, abs=0.01)
    from_config = ltm_convert.create_model(original.config, ratio=0.8)
    assert type(from_config).__name__ == "ViTForImageClassification"
    loaded = ltm_convert.load(ltm_convert.save(from_config, tmp_path / "c.pt"))
    with torch.no_grad():
        assert torch.equal(from_config(x).logits, loaded(x).logits)
    with pytest.raises(LtmError) as e:
        ltm_convert.create_model(original.config, pretrained=True)
    assert "holds no weights" in _one_line(e)


@pytest.mark.parametrize("make, says", [
    (lambda: ltm_convert.create_model(f"ltm_{VIT[:-1]}"), f"unknown model 'ltm_{VIT[:-1]}' (did you mean ltm_{VIT}"),
    (lambda: ltm_convert.create_model("no_such_model"), "unknown model 'no_such_model'"),
    (lambda: ltm_convert.load_model(f"ltm_{VIT}", pretrained=False), "ltm_convert.create_model("),
    (lambda: timm.create_model(f"ltm_{VIT}", bn_eps=1e-3), "'bn_eps', which is not an option"),
    (lambda: timm.create_model(f"ltm_{VIT}", cache_dir="/tmp"), "cache_dir is refused"),
    (lambda: timm.create_model(f"ltm_{VIT}", pretrained_cfg={"num_classes": 3}), f"ltm_{VIT}.TAG"),
    (lambda: ltm_convert.create_model(VIT, ratio=0.5, compression_ratio=0.7), "pass one"),
    (lambda: ltm_convert.create_model(VIT, ratio=1.5), "ratio must be in (0, 1]"),
    (lambda: ltm_convert.create_model(3), "needs a model name"),
])
def test_mistakes_are_one_clear_line(make, says) -> None:
    with pytest.raises(LtmError) as e:
        make()
    assert says in _one_line(e)


def test_unknown_ltm_name_in_timm_names_it() -> None:
    with pytest.raises(RuntimeError, match=re.escape("Unknown model (ltm_no_such_model)")):
        timm.create_model("ltm_no_such_model")


def test_timm_scripts_run_with_the_names(tmp_path: Path) -> None:
    script = tmp_path / "train.py"  # stands in for timm's train.py: it never imports ltm_convert
    script.write_text("import sys, timm\n"
                      "m = timm.create_model(sys.argv[1], img_size=64, patch_size=8, depth=3, **eval(sys.argv[2]))\n"
                      "print(__name__, type(m).__name__, m.ltm_config.ratio)\n")
    done = ok(subprocess.run([sys.executable, "-m", "ltm_convert.run", str(script), f"ltm_{VIT}", "{'ratio': 0.65}"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300))
    assert done.stdout.split() == ["__main__", "VisionTransformer", "0.65"], done.stdout
    missing = subprocess.run([sys.executable, "-m", "ltm_convert.run", "nope.py"], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no script nope.py"), missing.stderr


def test_readme_models_by_name_runs(tmp_path: Path) -> None:
    section = (REPO / "README.md").read_text().split("## Models by name", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = ok(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=300))
    assert float(done.stdout.split()[0]) == pytest.approx(0.8, abs=0.01), done.stdout
    assert (tmp_path / "ltm_mobilevit_xxs.pt").is_file()
    assert read_file(tmp_path / "ltm_mobilevit_xxs.pt")[0]["source"]["name"] == "mobilevit_xxs"
