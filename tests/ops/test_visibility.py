"""The one visibility rule (ops.label_attention.visible_keys) against the rule written out key by key, and the
loss's label counts (visible_label_counts, prefix sums) against the keys that rule lets through."""
import pytest
import torch

from abft_kernels.ops.label_attention import label_one_hot, visible_keys, visible_label_counts


def _by_hand(rows, seq_len, causal, padding, window):
    batch, num_rows = padding.shape[0], rows.shape[1]
    out = torch.zeros(batch, num_rows, seq_len, dtype=torch.bool)
    for b in range(batch):
        for r in range(num_rows):
            i = int(rows[b % rows.shape[0], r])
            for j in range(seq_len):
                out[b, r, j] = (i >= 0 and bool(padding[b, j]) and (not causal or j <= i)
                                and (window is None or j > i - window))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_visible_keys_is_the_rule_key_by_key(causal, window):
    torch.manual_seed(0)
    seq_len = 11
    padding = torch.rand(3, seq_len) > 0.3
    rows = torch.tensor([[0, 5, 10, -1], [3, -1, 7, 9], [10, 10, 2, 1]])
    expected = _by_hand(rows, seq_len, causal, padding, window)
    assert torch.equal(visible_keys(rows, seq_len, causal, padding, window), expected)
    # one row of positions serves every batch row (the transformers integration's call)
    shared = rows[:1]
    assert torch.equal(visible_keys(shared, seq_len, causal, padding, window),
                       _by_hand(shared, seq_len, causal, padding, window))


def test_drawn_example():
    """The docstring's example: N = 6, causal, window 3, key 4 padding, row 5 sees keys 3 and 5."""
    padding = torch.tensor([[True, True, True, True, False, True]])
    seen = visible_keys(torch.tensor([[5]]), 6, True, padding, 3)
    assert seen[0, 0].nonzero().flatten().tolist() == [3, 5]


@pytest.mark.parametrize("causal", [True, False])
def test_label_counts_count_the_visible_keys(causal):
    torch.manual_seed(1)
    batch, seq_len, num_classes = 3, 17, 4
    key_class = torch.randint(-1, num_classes, (batch, seq_len))
    padding = torch.rand(batch, seq_len) > 0.25
    rows = torch.tensor([[16, 3, -1], [0, 8, 12], [5, -1, 16]])
    n_c, n_t = visible_label_counts(key_class, num_classes, rows, padding, causal)
    seen = visible_keys(rows, seq_len, causal, padding).long()  # [B,R,N]
    assert torch.equal(n_c, torch.einsum("brn,bnc->brc", seen, label_one_hot(key_class, num_classes, torch.long)))
    assert torch.equal(n_t, seen.sum(-1))
