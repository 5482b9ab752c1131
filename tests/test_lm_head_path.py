"""The chunked LM-head path gives the logits path's log-probs and gradients, without the logits."""

import torch

import common


def test_lm_head_logprobs_gradcheck_and_values(monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 30)  # 2 rows per chunk at V = 11: several chunks
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda a, b: common.lm_head_logprobs(a, b, y, 0.7), (h, w))
    naive = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(common.lm_head_logprobs(h, w, y, 0.7), naive, rtol=0, atol=1e-12)


def test_model_path_matches_logits_path():
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL)
    assert common.chunked_lm_head_ok(model)
    rollouts = [{"prompt_ids": tokenizer("Q: 3+4")["input_ids"][: 3 + i], "response_ids": list(range(10, 14 + 2 * i))}
                for i in range(3)]
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    grads = []
    for chunked in (False, True):
        model.zero_grad()
        logp = common.response_logprobs(model, batch, 0.9, chunked_lm_head=chunked)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_a, g_a), (lp_b, g_b) = grads
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(g_a, g_b)) <= 1e-5
    assert max(a.abs().max().item() for a in g_a) > 0
