"""run_dir.py: the run directory's pruning leaves alone what this project did not write.

Real runs of configs/tiny.py on the Markov corpus, train.main in-process."""


import checkpoints
from conftest import tiny_args, train_main as main


COMMON = ["--lr_decay_steps=8", "--ckpt_interval=1", "--keep_last_ckpts=1", "--eval_interval=100"]


def test_a_resume_prunes_only_checkpoints_this_project_wrote(data_dir, tmp_path, capsys):
    """A user's folder under ckpt/ that looks like a checkpoint (a step_ name and a meta.json) but
    has no manifest that verifies is never pruned; the run says so once, naming it."""
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=2"))
    mine = checkpoints.step_dir(out, 1)  # pruned by the run: the name is free
    assert not mine.exists()
    mine.mkdir()
    (mine / "meta.json").write_text('{"step": 1}')
    (mine / "thesis.txt").write_text("four years of work")
    capsys.readouterr()
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=4", "--init_from=resume"))
    assert (mine / "thesis.txt").read_text() == "four years of work"
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["step_0000001", "step_0000004"]
    named = [line for line in capsys.readouterr().out.splitlines() if "step_0000001" in line]
    assert len(named) == 1 and "not a checkpoint this project wrote" in named[0], named
