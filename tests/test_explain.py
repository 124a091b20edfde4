"""``metattn explain``: tiny run directories of each learner family -> figures and one
self-contained HTML report; the report opened in a real headless chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from models import tiny
from test_omniglot import make_zip

from metattn.cli import main
from metattn.config import from_dict
from metattn.recipe import train

IMAGE_TASK = {"kind": "omniglot", "protocol": "background", "n_way": 3, "k_shot": 1,
              "k_query": 2}
# the tiny fake Omniglot release is deliberately incomplete
pytestmark = pytest.mark.filterwarnings("ignore:Omniglot.*holds .* characters:UserWarning")

LEARNERS = {
    "maml_vit": ({"kind": "vit", "n_classes": 3, "image_size": 28, "patch_size": 7,
                  "d_model": 16, "n_heads": 2, "n_layers": 2},
                 {"kind": "maml", "inner_lr": 0.1, "inner_steps": 1, "eval_inner_steps": 2}),
    "matching": ({"kind": "conv4", "n_classes": 3, "hidden": 8},
                 {"kind": "matching", "temperature": 10.0}),
    "feat": ({"kind": "conv4", "n_classes": 3, "hidden": 8},
             {"kind": "feat", "temperature": 20.0}),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    make_zip(root / "images_background.zip", "background", {"Alpha": 2, "Beta": 1})
    make_zip(root / "images_evaluation.zip", "evaluation", {"Gamma": 2})
    return root


def _run(tmp_path: Path, name: str, root: Path, monkeypatch) -> Path:
    monkeypatch.setenv("METATTN_CACHE", str(tmp_path / "cache"))
    cfg = tiny(train__steps=3, train__eval_every=0, train__checkpoint_every=0)
    cfg["eval"] = {"episodes": 6, "chunk": 6}
    if name == "icl":
        cfg["task"] = {"kind": "sinusoid", "k_shot": 8, "k_query": 1}
        cfg["model"] = {"kind": "icl_transformer", "d_x": 1, "d_model": 16, "n_layers": 2,
                        "n_heads": 2, "max_points": 9, "token_layout": "paired"}
        cfg["learner"] = {"kind": "incontext"}
        cfg["eval"]["task"] = {"k_query": 12}
    else:
        cfg["task"] = {**IMAGE_TASK, "root": str(root)}
        cfg["model"], cfg["learner"] = LEARNERS[name]
        cfg["train"]["meta_batch"] = 2
    out = tmp_path / name
    train(from_dict(cfg), out)
    return out


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


@pytest.mark.parametrize("name", [*LEARNERS, "icl"])
def test_explain_writes_figures_and_a_self_contained_report(name, tmp_path, image_root,
                                                             monkeypatch, capsys):
    run = _run(tmp_path, name, image_root, monkeypatch)
    out = tmp_path / "report"
    assert main(["explain", str(run), "--episodes", "2", "--faith-episodes", "6",
                 "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    srcs = _images(page)
    assert pngs and len(srcs) == len(pngs)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    # no resource of the page points anywhere: no http(s) URL, no src/href but data URIs
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", page)
    assert "http://" not in page and "https://" not in page
    assert "Content-Security-Policy" in page
    if name == "maml_vit":
        assert "before and after the inner loop" in page and "maml_rollout" in page
        assert "fused attention kernel" in page  # capture says it ran the math path
    if name != "maml_vit":
        assert "Faithfulness" in page and "lowest" in page
    if name == "icl":
        assert "icl_curve" in page
    if name != "matching":
        return
    # reproducible: the same fixed episodes give the same figures
    again = tmp_path / "again"
    main(["explain", str(run), "--episodes", "2", "--faith-episodes", "6", "--out",
          str(again)])
    assert _images((again / "report.html").read_text()) == srcs


def test_faithfulness_benchmark_prints_the_table_of_given_runs(tmp_path, image_root,
                                                                monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness.py"
    spec = importlib.util.spec_from_file_location("bench_faithfulness", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = _run(tmp_path, "matching", image_root, monkeypatch)
    tables = bench.main(["--runs", str(run), "--episodes", "4", "--out", str(tmp_path / "b")])
    rows = tables["changed / true_prob_drop"]
    assert [r[4] for r in rows] == ["top", "random", "lowest"] and rows[0][-2] == 4
    assert "prediction changed" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "faithfulness.json").read_text()) == tables


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                        "google-chrome")) if p), None)


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const requests = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: imgs.length, broken, requests});
  document.body.appendChild(out);
});
</script>"""


def test_report_opens_in_a_headless_browser(tmp_path, image_root, monkeypatch):
    """Every image loads and no request leaves the page (the report's own policy removed, so
    a stray URL would be fetched and show in the resource timings); a screenshot is kept."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium found (.ci/run installs Debian's chromium)")
    run = _run(tmp_path, "matching", image_root, monkeypatch)
    out = tmp_path / "report"
    assert main(["explain", str(run), "--episodes", "2", "--faith-episodes", "6",
                 "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                     .replace("</body>", PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    res = json.loads(found.group(1).replace("&quot;", '"'))
    assert res["images"] == len(_images(page)) > 0
    assert res["broken"] == 0
    assert [r for r in res["requests"] if not r.startswith("data:")] == []
    artefacts = Path(os.environ.get("METATTN_TEST_ARTIFACTS", "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = (artefacts / "explain_report.png").resolve()
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
