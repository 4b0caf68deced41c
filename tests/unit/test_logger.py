import pytest

from recipes.logger import RunLogger


class FakeRun:
    def __init__(self):
        self.exit_codes = []

    def log(self, record, step=None):
        pass

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


def test_logger_closes_on_every_way_out(tmp_path):
    """The training loop runs inside `with RunLogger(...)`: an exception still closes the files and finishes the
    wandb run, marked failed, and a clean exit marks it done."""
    with pytest.raises(RuntimeError, match="boom"):
        with RunLogger(str(tmp_path), enabled=True, total_steps=3, start_step=0, use_wandb=False,
                       wandb_project="t", config={}, progress=False) as logger:
            logger.wandb = run = FakeRun()
            logger.log(1, {"loss": 1.0})
            raise RuntimeError("boom")
    assert logger.jsonl.closed and run.exit_codes == [1]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    with RunLogger(str(tmp_path), enabled=True, total_steps=3, start_step=0, use_wandb=False,
                   wandb_project="t", config={}, progress=False) as logger:
        logger.wandb = run = FakeRun()
    assert logger.jsonl.closed and run.exit_codes == [0]
