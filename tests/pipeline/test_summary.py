"""The retrain summary says what its supervised rows are: a cheap floor with its budget."""

from pipeline.summary import _baseline_note


def test_the_supervised_baseline_states_its_training_budget() -> None:
    note = "\n".join(_baseline_note({"knn_top1": 0.8, "supervised_train_epochs": 0.10666}))
    assert "for 0.11 epochs" in note and "not a tuned result" in note


def test_no_supervised_rows_no_note() -> None:
    assert _baseline_note({"knn_top1": 0.8}) == []
