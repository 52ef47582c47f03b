import sys

import pytest
import torch

from attnkit import masks as M
from attnkit.cli import show
from attnkit.cli.main import main
from attnkit.cli.show import parse_spec


def test_parse_spec_builds_compositions():
    spec = parse_spec("sliding_window(3) | global_tokens([0, 5])")
    expected = M.sliding_window(3) | M.global_tokens(torch.tensor([0, 5]))
    assert torch.equal(spec.to_dense(12), expected.to_dense(12))
    spec = parse_spec("causal & prefix_lm(4)")
    assert torch.equal(spec.to_dense(9), (M.causal() & M.prefix_lm(4)).to_dense(9))


def test_parse_spec_block_layout_list_becomes_bool_tensor():
    spec = parse_spec("block_sparse([[1, 0], [1, 1]], 2)")
    assert spec.to_dense(4).tolist()[0][0] == [[True, True, False, False], [True, True, False, False],
                                                 [True, True, True, True], [True, True, True, True]]


@pytest.mark.parametrize("text, match", [
    ("foo(3)", "unknown spec 'foo'"),
    ("causal +", "not a valid expression"),
    ("causal + sliding_window(2)", "combined with & and |"),
    ("__import__('os')", "unknown spec '__import__'"),
    ("causal(foo)", "causal: 'foo' is not a literal"),
    ("alibi(8) & causal", "cannot combine ALiBi and Band with '&'"),
    ("causal + causal", "biases with \\+"),
    ("alibi(8) | alibi(8)", "masks combine with & and \\|"),
])
def test_parse_spec_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(text)


def test_show_command_writes_ascii_and_png(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["show", "causal & sliding_window(2)", "--size", "6", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "###..." in text and ".###.." in text  # windows of 3 keys
    assert "####" not in text
    assert out.stat().st_size > 1000


def test_show_bad_spec_is_a_clean_error(capsys):
    assert main(["show", "nope"]) == 2
    assert "unknown spec 'nope'" in capsys.readouterr().err


def test_parse_spec_adds_biases():
    spec = parse_spec("alibi(8) + alibi(8)")
    one = parse_spec("alibi(8)")
    assert torch.allclose(spec.to_dense(5, 5, heads=8), 2 * one.to_dense(5, 5, heads=8))


def test_show_writes_nothing_unless_asked(tmp_path, monkeypatch, capsys):
    """The README invocation: the picture and one line on how to get a file; no file appears."""
    monkeypatch.chdir(tmp_path)
    assert main(["show", "causal & sliding_window(3)", "--size", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "For a picture file add --out FILE.png."
    assert list(tmp_path.iterdir()) == []


def test_show_without_matplotlib_prints_the_picture_and_how_to_get_the_png(tmp_path, monkeypatch, capsys):
    """A core install (no ``cli`` extra): exit 0, the ASCII picture, one line naming the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.chdir(tmp_path)
    assert main(["show", "causal & sliding_window(3)", "--size", "16"]) == 0
    cap = capsys.readouterr()
    assert "####............" in cap.out and cap.err == ""
    assert cap.out.splitlines()[-1] == "For a picture file add --out FILE.png (needs matplotlib: pip install 'attnkit[cli]')."
    assert list(tmp_path.iterdir()) == []


def test_show_out_without_matplotlib_is_a_clear_error_after_the_picture(tmp_path, monkeypatch, capsys):
    """Decision: a file that was asked for and cannot be written is an error (exit 2), not a warning."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "m.png"
    assert main(["show", "causal", "--size", "4", "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert "####" in cap.out
    assert cap.err.strip() == (f"attnkit show: error: --out {str(out)!r} needs matplotlib, which is not installed: "
                               "pip install 'attnkit[cli]'")
    assert not out.exists()


def test_show_says_where_the_file_went(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["show", "causal", "--size", "4", "--out", "c.svg"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'c.svg'}"
    assert [p.name for p in tmp_path.iterdir()] == ["c.svg"]


@pytest.mark.parametrize("argv, message", [
    (["causal", "--size", "-5"], "--size must be >= 1, got -5"),
    (["causal", "--size", "0"], "--size must be >= 1, got 0"),  # was "nan% of pairs"
    (["alibi(8)", "--size", "0"], "--size must be >= 1, got 0"),
    (["causal", "--head", "-1"], "--head must be >= 0, got -1"),
    (["alibi(8)", "--head", "-1"], "--head must be >= 0, got -1"),
    (["causal", "--nq", "0"], "--nq must be >= 1, got 0"),  # was silently ignored
    (["causal", "--nq", "-3"], "--nq must be >= 1, got -3"),
    (["causal", "--size", "100000"], f"--size 100000 is above show's limit of {show.MAX_SIZE}"),
    (["alibi(8)", "--size", "100000"], f"--size 100000 is above show's limit of {show.MAX_SIZE}"),
    (["causal", "--nq", str(show.MAX_SIZE + 1)], f"--nq {show.MAX_SIZE + 1} is above show's limit"),
    (["causal", "--out", "none"], "--out must name a .png, .svg, .pdf file, got 'none'"),
    (["causal", "--out", "pic.jpeg"], "--out must name a .png, .svg, .pdf file"),
    (["causal", "--mask", "causal"], "--mask applies to a bias spec; combine masks with & instead"),
    (["alibi(8)", "--mask", "alibi(8)"], "--mask 'alibi(8)' is not a mask spec (got ALiBi)"),
    (["alibi(8)", "--head", "8"], "ALiBi was built for 8 heads but was asked for head 8"),
    (["t5(4)", "--head", "4"], "T5Bias table has 4 heads but was asked for head 4"),
    (["sliding_window(-1)"], "sliding_window: left must be an int >= 0, got -1"),
    (["causal(1)"], "causal() takes 0 positional arguments"),
    (["1"], "cannot read '1'"),
])
def test_show_bad_options_are_one_line_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["show", *argv]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("attnkit show: error: ") and message in cap.err, cap.err
    assert list(tmp_path.iterdir()) == []


def test_show_largest_size_runs(capsys):
    assert main(["show", "sliding_window(3)", "--size", str(show.MAX_SIZE), "--nq", "2"]) == 0
    assert "too wide for ASCII" in capsys.readouterr().out


def test_show_non_square_uses_nq(capsys):
    assert main(["show", "causal", "--size", "4", "--nq", "2"]) == 0
    out = capsys.readouterr().out
    assert "Nq=2, Nk=4" in out and "###.\n####" in out


def test_show_bias_fully_blocked_by_mask(capsys):
    assert main(["show", "alibi(8)", "--size", "3", "--mask", "key_padding([0])"]) == 0
    assert "every pair blocked by --mask" in capsys.readouterr().out


def test_show_draws_alibi_heat_map_with_mask(capsys, tmp_path):
    out = tmp_path / "alibi.png"
    assert main(["show", "alibi(8)", "--size", "5", "--head", "0", "--mask", "causal", "--out", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in text[1:6]]
    # head 0 of 8 has slope 1/2: bias -0.5 * (i - j) below the diagonal, blank (nan) above it
    assert rows[4][:5] == ["-2.00", "-1.50", "-1.00", "-0.50", "0.00"]
    assert rows[0][1] == "nan"
    assert out.stat().st_size > 1000


def test_show_draws_t5_bias(capsys):
    assert main(["show", "t5(4)", "--size", "12"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 12 + 1  # summary, 12 rows, the --out hint
