"""One progress convention: people read stderr, programs read stdout."""

from toolkit.core.progress import bar, quiet, say


def test_say_and_bar_write_to_stderr_only(capsys):
    say("loading")
    quiet("nothing")
    b = bar(3, desc="train", unit="step")
    b.update(3)
    b.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("loading\n") and "nothing" not in err and "train" in err
