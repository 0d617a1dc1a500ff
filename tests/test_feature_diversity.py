"""The paper's feature cosine distance: hand-computed cases, collapsed vs random channels, and the CLI."""
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tools.feature_diversity import channel_cosine_distance, feature_distances, main, run
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(x):
    """(1/C^2) sum_ij (1 - cos(X_i, X_j)) / 2 per sample, with the C x C matrix, for (N, C, H, W)."""
    out = []
    for sample in x:
        u = torch.nn.functional.normalize(sample.flatten(1).double(), dim=1)
        cos = u @ u.T
        out.append(((1 - cos) / 2).mean())
    return torch.stack(out).float()


def test_hand_computed_cases():
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 3.0, 0])  # orthogonal maps (2x2 once reshaped)
    maps = lambda *chs: torch.stack(chs).view(1, len(chs), 2, 2)  # noqa: E731
    assert channel_cosine_distance(maps(a, a)).item() == pytest.approx(0.0)  # identical channels
    assert channel_cosine_distance(maps(a, b)).item() == pytest.approx(0.25)  # (0 + 1/2 + 1/2 + 0) / 4
    assert channel_cosine_distance(maps(a, -a)).item() == pytest.approx(0.5)  # opposite
    assert channel_cosine_distance(maps(a, 3 * a, b)).item() == pytest.approx(2 / 9)  # 4 of 9 pairs at 1/2
    # a dead (all-zero) channel: cosine 0 with the others, 1 with itself
    assert channel_cosine_distance(maps(a, torch.zeros(4))).item() == pytest.approx(0.25)


def test_matches_the_pairwise_definition_in_both_layouts():
    x = torch.randn(3, 7, 5, 4)
    torch.testing.assert_close(channel_cosine_distance(x), brute_force(x))
    torch.testing.assert_close(channel_cosine_distance(x.permute(0, 2, 3, 1), channel_dim=-1), brute_force(x))


@pytest.mark.parametrize("activation", ["mlp", "block"])
def test_collapsed_channels_score_zero_random_ones_do_not(activation):
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)
    random = feature_distances(model, images, activation)
    assert [len(s) for s in random] == [1, 1, 2, 1]
    assert all(0 <= d <= 0.5 for s in random for d in s) and max(d for s in random for d in s) > 0.05
    with torch.no_grad():
        for stage in model.stages:
            for block in stage.blocks:
                if activation == "mlp":  # every hidden unit computes the same function
                    block.mlp.fc1.weight.copy_(block.mlp.fc1.weight[:1].expand_as(block.mlp.fc1.weight))
                    block.mlp.fc1.bias.fill_(block.mlp.fc1.bias[0].item())
    if activation == "block":  # the last block of stage 2 (two blocks) outputs one map in every channel
        last = model.stages[2].blocks[1]
        last.register_forward_hook(lambda m, a, out: out[:, :1].expand_as(out))
    collapsed = feature_distances(model, images, activation)
    if activation == "mlp":
        assert max(d for s in collapsed for d in s) < 1e-5
    else:
        assert collapsed[2][1] < 1e-5 and collapsed[2][0] == pytest.approx(random[2][0])


def test_cli_table_plot_json_and_errors(tmp_path, capsys):
    torch.manual_seed(1)
    ckpt = tmp_path / "tiny.safetensors"
    save_file(timm.create_model(TINY, num_classes=0, in_chans=1).state_dict(), str(ckpt))  # grey
    out = run([str(ckpt), "--random-init", "--labels", "trained", "random", "--images", "4", "--input-size", "32",
               "--out", str(tmp_path / "d.png"), "--json", str(tmp_path / "d.json")])
    printed = capsys.readouterr().out
    assert "| trained |" in printed and "| random |" in printed and "stage 4" in printed
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["distances"] == out["distances"] and set(saved["distances"]) == {"trained", "random"}
    assert [len(s) for s in saved["distances"]["random"]] == [1, 1, 2, 1]
    assert Image.open(tmp_path / "d.png").size[0] > 300
    # bad input: one error line, exit code 2
    for argv, message in [([str(tmp_path / "missing.pth")], "checkpoint not found"),
                          ([str(ckpt), "--labels", "a", "b"], "--labels names 2 models"),
                          (["--random-init"], "needs --model"),
                          ([str(ckpt), "--images", "0"], "--images must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
