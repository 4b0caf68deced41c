"""recipes/plot.py: JSONL -> PNG, with resumed-run duplicates resolved and empty panels dropped."""
import json

import pytest
from PIL import Image

from recipes.plot import load_series, main, plot


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_last_record_per_step_wins_and_non_numbers_are_ignored(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, [{"step": 1, "loss": 3.0, "note": "x"}, {"step": 2, "loss": 2.5},
                    {"step": 2, "loss": 2.0, "lr": 1e-3}, {"step": 2, "eval/demo/zeroshot_top1": 0.4}])
    series = load_series(log)
    assert series["loss"] == [(1, 3.0), (2, 2.0)]
    assert series["lr"] == [(2, 1e-3)] and series["eval/demo/zeroshot_top1"] == [(2, 0.4)]
    assert "note" not in series


def test_plot_writes_a_png_with_the_panels_that_have_data(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 4.0 / s, "loss/global_caption": 4.0 / s, "lr": 1e-3 * s, "samples_per_s": 100.0,
                "mfu": 0.3, "data_wait": 0.05, "temperature": 0.07} for s in range(1, 31)]
    records += [{"step": 10, "eval/demo/zeroshot_top1": 0.2, "eval/demo/image_to_text_R@1": 0.1},
                {"step": 30, "eval/demo/zeroshot_top1": 0.5, "eval/demo/image_to_text_R@1": 0.3}]
    write_log(log, records)
    drawn = plot(load_series(log), tmp_path / "curves.png")
    assert drawn == ["loss", "learning rate", "temperature", "samples / s", "MFU", "data-wait fraction",
                     "zero-shot top-1", "retrieval R@1"]  # no memory keys were logged: no memory panel
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] > 1000 and image.size[1] > 600


def test_cli_defaults_to_curves_png_beside_the_log(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    write_log(log, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    main([str(log)])
    assert (tmp_path / "curves.png").stat().st_size > 0 and "loss" in capsys.readouterr().out


def test_log_without_metrics_is_an_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, [{"step": 1, "note": "nothing to draw"}])
    with pytest.raises(ValueError, match="no plottable"):
        plot(load_series(log), tmp_path / "curves.png")
