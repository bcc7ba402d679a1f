"""abft_loss and PIDController against hand-computed values."""
import math

import pytest
import torch

import abft_kernels as ak


def hand_case():
    # Sample 0: labels at 1 (class 0) and 3 (class 1); row 5 sees both: k = 2, n_t = 6.
    # Sample 1: the class-0 label at 0 is padding, so only position 2 (class 0) is visible from row 5:
    #           k = 1, n_t = 5, and the gold class 1 has no label among the demonstrations (n_y = 0).
    key_class = torch.tensor([[-1, 0, -1, 1, -1, -1], [0, -1, 0, -1, -1, -1]])
    key_padding_mask = torch.tensor([[True] * 6, [False] + [True] * 5])
    query_rows = torch.tensor([[5, 4], [5, 3]])
    target_class = torch.tensor([[0, -1], [1, -1]])  # second row of each sample is ignored
    mass = torch.zeros(2, 2, 2, 2)  # [B, H, R, C]
    mass[0, 0, 0] = torch.tensor([0.5, 0.2])  # S = 0.7 > T = 2/(2+ln 6) = 0.527: counted
    mass[0, 1, 0] = torch.tensor([0.1, 0.2])  # S = 0.3: below the threshold
    mass[1, 0, 0] = torch.tensor([0.6, 0.0])  # S = 0.6 > T = 1/(1+ln 5) = 0.383: counted, n_y = 0
    mass[1, 1, 0] = torch.tensor([0.2, 0.0])  # S = 0.2: below
    mass[:, :, 1] = 0.9  # ignored rows: would count if they were not ignored
    return mass, target_class, key_class, query_rows, key_padding_mask


def test_loss_hand_computed():
    mass, target, key_class, rows, pad = hand_case()
    mass.requires_grad_(True)
    loss, info = ak.abft_loss([mass], target, key_class, rows, A=0.5, B=1.0, key_padding_mask=pad)
    # counted: 0.5·(0.7−0.5) + 1·(1−0.5) = 0.6 and 0.5·(0.6−0) + 1·(0−0) = 0.3, averaged over 2 target rows.
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    assert info.counted_heads.tolist() == [1.0, 1.0]
    assert info.mean_counted_heads == 1.0
    assert info.num_target_rows == 2
    torch.testing.assert_close(info.threshold[:, 0], torch.tensor([2 / (2 + math.log(6)), 1 / (1 + math.log(5))]))
    loss.backward()
    # dL/dmass of a counted head: A on the wrong classes, −B on the gold class; divided by the 2 rows.
    torch.testing.assert_close(mass.grad[0, 0, 0], torch.tensor([-0.5, 0.25]))
    torch.testing.assert_close(mass.grad[1, 0, 0], torch.tensor([0.25, -0.5]))
    assert (mass.grad[:, 1] == 0).all() and (mass.grad[:, :, 1] == 0).all()


@pytest.mark.parametrize("A, B, expected", [
    (0.5, 1.0, (0.6 + 0.3) / 2),  # the paper's loss
    (0.0, 1.0, (0.5 + 0.0) / 2),  # ablation A = 0: only the gold-label term 1·(n_y − m_y)
    (0.5, 0.0, (0.1 + 0.3) / 2),  # ablation B = 0: only the wrong-label term 0.5·(S − m_y)
])
def test_loss_ablations_of_the_two_terms(A, B, expected):
    mass, target, key_class, rows, pad = hand_case()
    loss, info = ak.abft_loss([mass], target, key_class, rows, A=A, B=B, key_padding_mask=pad)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert info.counted_heads.tolist() == [1.0, 1.0]


def test_loss_ablation_every_head_counted():
    mass, target, key_class, rows, pad = hand_case()
    mass.requires_grad_(True)
    loss, info = ak.abft_loss([mass], target, key_class, rows, key_padding_mask=pad, count_all_heads=True)
    # the heads below the threshold join: 0.5·(0.3−0.1) + 1·(1−0.1) = 1.0 and 0.5·(0.2−0) + 0 = 0.1
    assert loss.item() == pytest.approx((0.6 + 0.3 + 1.0 + 0.1) / 2, abs=1e-6)
    assert info.counted_heads.tolist() == [1.0, 1.0]  # the report still counts the filter's heads
    loss.backward()
    torch.testing.assert_close(mass.grad[0, 1, 0], torch.tensor([-0.5, 0.25]))
    assert (mass.grad[:, :, 1] == 0).all()  # rows without a target stay out


def test_loss_sums_layers_and_accepts_stacked_tensor():
    mass, target, key_class, rows, pad = hand_case()
    second = mass.clone()
    second[0, 1, 0] = torch.tensor([0.4, 0.4])  # now counted: 0.5·0.4 + 1·(1−0.4) = 0.8
    loss_list, info = ak.abft_loss([mass, second], target, key_class, rows, key_padding_mask=pad)
    loss_stack, _ = ak.abft_loss(torch.stack([mass, second]), target, key_class, rows, key_padding_mask=pad)
    assert loss_list.item() == pytest.approx((0.6 + 0.3 + 0.6 + 0.3 + 0.8) / 2, abs=1e-6)
    assert loss_stack.item() == pytest.approx(loss_list.item())
    assert info.counted_heads.tolist() == [3.0, 2.0]


def test_loss_every_row_and_no_target():
    torch.manual_seed(0)
    key_class = torch.tensor([[0, -1, 1, -1]])
    mass = torch.rand(1, 1, 4, 2)
    loss, info = ak.abft_loss(mass, torch.full((1, 4), -1), key_class, None)
    assert loss.item() == 0.0 and info.num_target_rows == 0 and info.mean_counted_heads == 0.0
    target = torch.tensor([[-1, -1, -1, 1]])
    mass = torch.tensor([[[[0, 0], [0, 0], [0, 0], [0.3, 0.6]]]])
    loss, info = ak.abft_loss(mass, target, key_class, None, A=2.0, B=3.0)
    # row 3 sees 2 labels among 4 tokens: T = 2/(2+ln 4) = 0.59 < 0.9 -> 2·0.3 + 3·(1−0.6)
    assert loss.item() == pytest.approx(0.6 + 1.2, abs=1e-6)


def test_no_visible_label_never_counts():
    key_class = torch.tensor([[-1, -1, 0]])
    mass = torch.tensor([[[[0.0]]]])
    loss, info = ak.abft_loss(mass, torch.tensor([[0]]), key_class, torch.tensor([[1]]))
    assert math.isinf(info.threshold.item()) and loss.item() == 0.0 and not info.counted.any()


@pytest.mark.parametrize("bad, match", [
    (dict(target_class=torch.tensor([[2, -1], [0, -1]])), "target_class"),
    (dict(target_class=torch.tensor([[0], [0]])), "target_class"),
    (dict(key_class=torch.tensor([[0, 5, -1, -1, -1, -1]] * 2)), "key_class"),
    (dict(query_rows=torch.tensor([[6, 1], [1, 1]])), "query_rows"),
    (dict(query_rows=torch.tensor([[-1, 1], [1, 1]])), "empty query_rows slot"),
    (dict(masses=[]), "masses"),
    (dict(key_padding_mask=torch.ones(2, 6)), "key_padding_mask"),
])
def test_loss_bad_input(bad, match):
    mass, target, key_class, rows, pad = hand_case()
    kwargs = dict(masses=[mass], target_class=target, key_class=key_class, query_rows=rows, key_padding_mask=pad)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        ak.abft_loss(**kwargs)


def test_pid_hand_computed():
    pid = ak.PIDController(A0=0.5)
    assert pid.update(10) == 0.5 and pid.update(12) == 0.5
    # 0.03·(15−12) + 0.005·(15−10) + 0.005·(15−24+10) = 0.12
    assert pid.update(15) == pytest.approx(0.62)
    # 0.03·(14−15) + 0.005·(14−10) + 0.005·(14−30+12) = −0.03
    assert pid.update(14) == pytest.approx(0.59)
    restored = ak.PIDController()
    restored.load_state_dict(pid.state_dict())
    assert restored.update(14) == pytest.approx(pid.update(14))
