"""Training pieces: the distillation targets kept once per block, and the losses they give."""

import torch
import torch.nn.functional as F

from linearize.train.targets import TeacherTargets, distillation_loss, top_k_kl


def test_top_k_kl_over_the_whole_vocabulary_is_the_exact_kl(tmp_path):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = TeacherTargets(tmp_path, top_k=11)
    indices, logprobs = targets.get([0, 1], lambda ids: teacher[ids])
    torch.testing.assert_close(top_k_kl(student, indices, logprobs), distillation_loss(student, teacher),
                               rtol=1e-5, atol=1e-6)


def test_top_k_kl_is_a_lower_bound_that_tightens_with_k_and_vanishes_at_the_teacher(tmp_path):
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 7, 50) * 3, torch.randn(1, 7, 50) * 3
    full = distillation_loss(student, teacher)
    values = []
    for k in (4, 16, 50):
        indices, logprobs = TeacherTargets(tmp_path / str(k), top_k=k).get([0], lambda ids: teacher[ids])
        values.append(top_k_kl(student, indices, logprobs))
        assert top_k_kl(teacher, indices, logprobs) < 1e-5
    assert values[0] <= values[1] <= values[2] + 1e-6 and values[2] <= full + 1e-5


def test_targets_are_computed_once_and_read_back(tmp_path):
    calls = []
    teacher = torch.randn(3, 4, 9)

    def compute(ids):
        calls.append(list(ids))
        return teacher[ids]

    targets = TeacherTargets(tmp_path, top_k=3)
    first = targets.get([2, 0], compute)
    again = TeacherTargets(tmp_path, top_k=3).get([0, 2, 1], compute)
    assert calls == [[2, 0], [1]]
    torch.testing.assert_close(again[1][1], first[1][0])
    expected = F.log_softmax(teacher[1], -1).topk(3, -1)
    torch.testing.assert_close(again[1][2], expected.values)
    assert torch.equal(again[0][2], expected.indices)


def test_answer_weights_weigh_the_positions_that_predict_an_answer():
    """finetune.answer_weight: the prediction of each answer token (made one position earlier) counts `weight`
    times in both losses; with weight 1, or rows without answers, the losses are the unweighted ones."""
    from linearize.train.finetune import answer_weights

    answers = torch.zeros(3, 6, dtype=torch.bool)
    answers[1, 3:5] = True
    weights = answer_weights(answers, [1, 0], 10.0, "cpu")
    assert weights.tolist() == [[1, 1, 10, 10, 1, 1], [1] * 6]
    assert answer_weights(answers, [0, 2], 10.0, "cpu") is None and answer_weights(answers, [1], 1.0, "cpu") is None
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 50), torch.randn(2, 6, 50)
    indices = teacher.topk(8, dim=-1).indices
    logprobs = teacher.log_softmax(-1).gather(-1, indices)
    ones = torch.ones(2, 6)
    torch.testing.assert_close(top_k_kl(student, indices, logprobs, ones), top_k_kl(student, indices, logprobs))
    torch.testing.assert_close(distillation_loss(student, teacher, ones), distillation_loss(student, teacher))
    per_position = distillation_loss(student, teacher, torch.eye(6)[[2, 2]] * 6.0)  # position 2 alone: x 6 of 12
    log_s, log_t = student[:, 2].log_softmax(-1), teacher[:, 2].log_softmax(-1)
    torch.testing.assert_close(per_position, (log_t.exp() * (log_t - log_s)).sum(-1).mean())
