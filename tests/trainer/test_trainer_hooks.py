"""The trainer's hooks for the examples' algorithms (issue 19, point 7): a step whose source has no items makes
no update and no scheduler step; `on_step_end` sees every step; `optimizers=(optimizer, scheduler)` replaces
the config's. A float64 linear model with SGD, against updates written out by hand."""
import torch

from elleci.trainer import Trainer, TrainerConfig

X = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.25], [-2.0, 1.5]], dtype=torch.float64)
Y = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 1, bias=False).double()


def step_fn(model, idx):
    """Mean squared error over the items (row indices) of the micro-batch."""
    i = torch.tensor(idx)
    return ((model(X[i])[:, 0] - Y[i]) ** 2).mean(), {}


class Source:
    """Step k's items from `plan[k]` (an empty list: nothing to learn from this step)."""

    def __init__(self, plan):
        self.plan, self.k = plan, None

    def step_items(self, step, batch_size):
        self.k = step
        return self.plan[step]

    def step_metrics(self):
        return {"drawn": float(len(self.plan[self.k]))}


def _cfg(steps, **kw):
    return TrainerConfig(steps=steps, batch_size=2, micro_batch_size=2, lr=0.5, optimizer="sgd", max_grad_norm=0.0,
                         schedule="constant", warmup_steps=3, log_every=1, progress="none", handle_signals=False,
                         **kw)


def _by_hand(plan, lambdas, lr=0.5):
    model = _model()
    for idx, lam in zip(plan, lambdas):
        loss, _ = step_fn(model, idx)
        loss.backward()
        with torch.no_grad():
            model.weight.add_(model.weight.grad, alpha=-(lr * lam))
        model.weight.grad = None
    return model.weight.detach()


def test_an_empty_step_makes_no_update_and_no_scheduler_step():
    plan = [[0, 1], [], [2, 3]]
    model, seen = _model(), []
    history = Trainer(model, step_fn, Source(plan), _cfg(3), units=lambda b: len(b),
                      on_step_end=lambda tr, step, m: seen.append((step, dict(m)))).train()
    # warmup 3: λ(k) = (k + 1) / 3; the empty step leaves the scheduler at k = 1 for the third step
    expected = _by_hand([plan[0], plan[2]], [1 / 3, 2 / 3])
    assert torch.allclose(model.weight.detach(), expected, rtol=0, atol=1e-15)
    assert not torch.allclose(expected, _by_hand([plan[0], plan[2]], [1 / 3, 1.0]), atol=1e-6)   # a visible change
    assert [s for s, _ in seen] == [1, 2, 3]
    assert seen[1][1] == {"drawn": 0.0} and "loss" in seen[0][1] and "loss" in seen[2][1]
    assert [r["step"] for r in history] == [1, 2, 3] and "loss" not in history[1] and history[1]["drawn"] == 0.0
    assert seen[2][1]["lr"] == 0.5 * 2 / 3


def test_given_optimizers_replace_the_configs():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.25)
    trainer = Trainer(model, step_fn, Source([[0, 1]]), _cfg(1), units=lambda b: len(b), optimizers=(opt, sched))
    assert trainer.optimizer is opt and trainer.scheduler is sched
    trainer.train()
    assert torch.allclose(model.weight.detach(), _by_hand([[0, 1]], [0.25]), rtol=0, atol=1e-15)
