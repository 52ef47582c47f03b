import pytest
import torch

from attnkit import masks as M
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
    assert main(["show", "nope", "--out", "none"]) == 2
    assert "unknown spec 'nope'" in capsys.readouterr().err


def test_show_draws_alibi_heat_map_with_mask(capsys, tmp_path):
    out = tmp_path / "alibi.png"
    assert main(["show", "alibi(8)", "--size", "5", "--head", "0", "--mask", "causal", "--out", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in text[1:6]]
    # head 0 of 8 has slope 1/2: bias -0.5 * (i - j) below the diagonal, blank (nan) above it
    assert rows[4][:5] == ["-2.00", "-1.50", "-1.00", "-0.50", "0.00"]
    assert rows[0][1] == "nan"
    assert out.stat().st_size > 1000


def test_show_draws_t5_bias():
    assert main(["show", "t5(4)", "--size", "12", "--out", "none"]) == 0
