"""What ``vpeft report`` prints for a results folder: readable method names, a decoder column where runs differ in
decoder, the parameter share against full fine-tuning; and the README's segmentation table is exactly what it
prints for the README's measured numbers (records made without training, as tests/test_bench.py makes them)."""

from __future__ import annotations

import re
from pathlib import Path

import vpeft  # noqa: F401  (registers the built-in methods)
from vpeft.bench.labels import METHOD_TITLES, readable_labels, settings_text
from vpeft.bench.records import record_path, write_record
from vpeft.bench.report import build_leaderboard, render_markdown
from vpeft.cli import main
from vpeft.registry import list_methods

README = Path(__file__).resolve().parents[1] / "README.md"

# The README's CamVid runs: label, method, settings, decoder, test mIoU, method / decoder params, peak train MiB.
CAMVID = [
    ("frozen", "linear", {}, "linear", 0.292, 0, 5003, 277),
    ("bitfit", "bitfit", {}, "linear", 0.329, 51456, 5003, 398),
    ("lora", "lora", {"r": 8, "targets": ["q", "v"]}, "linear", 0.342, 147456, 5003, 417),
    ("adaptformer", "adaptformer", {"bottleneck": 16, "scale": 0.1}, "linear", 0.346, 152256, 5003, 426),
    ("vpt_deep", "vpt_deep", {"num_tokens": 10}, "linear", 0.356, 46080, 5003, 452),
    ("ssf", "ssf", {}, "linear", 0.335, 102912, 5003, 495),
    ("full", "full", {}, "linear", 0.344, 21555072, 5003, 639),
    ("vpt_deep_fpn", "vpt_deep", {"num_tokens": 10}, "fpn", 0.377, 46080, 1100171, 559),
    ("adaptformer_fpn", "adaptformer", {"bottleneck": 16, "scale": 0.1}, "fpn", 0.360, 152256, 1100171, 535),
]
CLASSES = ["sky", "building", "road"]


def _record(label, name, settings, decoder, miou, method_p, decoder_p, mem_mib, task="camvid", seed=0, old=False):
    """A record as ``vpeft bench`` writes it for a segmentation run (``old``: without the ``decoder`` field)."""
    rec = {
        "run_id": f"{label}/{task}/seed{seed}", "method": label, "method_name": name, "task": task, "group": "dense",
        "seed": seed, "status": "ok", "fingerprint": "x", "env": {"vpeft": "0", "torch": "2"},
        "spec": {"settings": settings, "task_options": {"decoder": decoder, "size": [84, 112]}},
        "top1": miou, "score": miou, "primary_metric": "miou", "task_kind": "segmentation", "decoder": decoder,
        "test_metrics": {"miou": miou, "pixel_acc": 0.8, "iou": [miou, miou / 2, None]}, "class_names": CLASSES,
        "trainable_params": method_p + decoder_p, "method_params": method_p, "decoder_params": decoder_p,
        "total_params": 21_555_072 + decoder_p, "delta_bytes": 4 * (method_p + decoder_p),
        "peak_train_mem_bytes": mem_mib * 2**20, "train_images_per_s": 20.0, "train_time_s": 100.0,
        "latency": {"batch_size": 8, "unmerged_ms": 5.0, "merged_ms": 4.0},
    }  # fmt: skip
    if old:
        del rec["decoder"]
    return rec


def _write(out: Path, records) -> Path:
    for rec in records:
        write_record(record_path(out, rec["method"], rec["task"], rec["seed"]), rec)
    return out


def _tables(text: str) -> list[list[str]]:
    """The Markdown tables of ``text``, each as its lines."""
    return [block.splitlines() for block in re.findall(r"(?m)^(?:\|.*\|\n)+", text)]


def _readme_camvid_table() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**Measured on real CamVid**") :]
    return _tables(section)[0]


def test_readme_segmentation_table_is_what_vpeft_report_prints(tmp_path, capsys):
    out = _write(tmp_path / "seg-camvid", [_record(*row) for row in CAMVID])
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    tables = _tables(printed)
    assert tables[0] == _readme_camvid_table(), "README.md's CamVid table differs from what `vpeft report` prints"
    head = tables[0][0]
    assert head.startswith("| method | decoder | test mIoU (%) | method params | decoder params |")
    assert "% of full's trainable" in head and "% of model" not in printed
    cost = tables[1]
    assert cost[0].startswith("| method | decoder | trainable params | method params | decoder params | % of full's")
    assert "| VPT-Deep (num_tokens=10) | fpn | 1,146,251 | 46,080 | 1,100,171 | 5.32 |" in cost[2]
    per_class = tables[2]
    assert per_class[0] == "| method | decoder | sky | building | road |"
    assert per_class[2] == "| VPT-Deep (num_tokens=10) | fpn | 37.7 | 18.9 | - |", "rows in the board's order"
    assert "task `camvid`" in printed and "vpt_deep_fpn" not in printed, "readable names, not definition labels"


def test_old_records_without_a_decoder_field_read_it_from_the_task_options():
    recs = [_record(*CAMVID[0], old=True), _record(*CAMVID[-1], old=True)]
    md = render_markdown(build_leaderboard(recs))
    assert "| AdaptFormer (bottleneck=16, scale=0.1) | fpn | 36.0 |" in md
    assert "| frozen backbone | linear | 29.2 |" in md
    del recs[1]["spec"]["task_options"]["decoder"]  # nor there: the segmentation default, so one decoder for all
    md = render_markdown(build_leaderboard(recs))
    assert "decoder `linear`" in md and "| AdaptFormer (bottleneck=16, scale=0.1) | 36.0 |" in md


def test_one_decoder_no_full_run_share_of_the_model():
    """The decoder column only where runs differ in decoder (else the description names it); without a full
    fine-tuning row the share is of all the model's parameters."""
    rows = [r for r in CAMVID if r[3] == "linear" and r[1] != "full"]
    md = render_markdown(build_leaderboard([_record(*row) for row in rows]))
    head = _tables(md)[0][0]
    assert head == (
        "| method | test mIoU (%) | method params | decoder params | % of model | peak train mem (MiB) |"
    ), head
    assert "decoder `linear`" in md and "| VPT-Deep (num_tokens=10) | 35.6 | 46,080 | 5,003 | 0.237 | 452 |" in md


def test_several_tasks_keep_the_per_task_columns_with_readable_names():
    recs = [_record(*row, task=t) for row in CAMVID[:2] + CAMVID[-2:] for t in ("camvid", "ade")]
    tables = _tables(render_markdown(build_leaderboard(recs)))
    assert tables[0][0].startswith("| method | decoder | params (M) | camvid | ade | Dense mean |")
    assert any(line.startswith("| frozen backbone | linear | 0.005 | 29.2 | 29.2 |") for line in tables[0])


def test_every_registered_method_has_a_readable_title():
    from vpeft.bench.labels import method_title

    missing = sorted(n for n in list_methods() if method_title(n) == n and n not in METHOD_TITLES)
    assert not missing, f"give these methods a `title` class attribute: {missing}"
    assert method_title("aim") == "AIM"  # from the method's own class: a new method is one file


def test_readable_labels_are_unique():
    rows = [
        {"label": "lora_a", "method_name": "lora", "settings": {"r": 8}, "decoder": None},
        {"label": "lora_b", "method_name": "lora", "settings": {"r": 8}, "decoder": None},
        {"label": "lin", "method_name": "linear", "settings": {}, "decoder": None},
        {"label": "seg", "method_name": "linear", "settings": {}, "dense": True, "decoder": "linear"},
        {"label": "mine", "method_name": "mine", "settings": None, "decoder": None},
        {"label": "vpt", "method_name": "vpt_deep", "settings": {"num_tokens": 10}, "decoder": "linear"},
        {"label": "vpt_fpn", "method_name": "vpt_deep", "settings": {"num_tokens": 10}, "decoder": "fpn"},
    ]
    assert readable_labels(rows) == [
        "LoRA (r=8) [lora_a]", "LoRA (r=8) [lora_b]", "linear probe", "frozen backbone", "mine",
        "VPT-Deep (num_tokens=10)", "VPT-Deep (num_tokens=10)",  # told apart by the decoder column
    ]  # fmt: skip
    assert settings_text({"r": 8, "targets": ["q", "v"], "opts": {"a": 1}}) == "r=8, targets=q,v, opts={a=1}"


def test_html_page_has_the_same_columns():
    from vpeft.bench.report import render_html

    page = render_html(build_leaderboard([_record(*row) for row in CAMVID]))
    for title in ("decoder", "% of full&#x27;s trainable", "VPT-Deep (num_tokens=10)", "frozen backbone"):
        assert title in page, title
