"""The deflated variant (ALGORITHM.md section 7): the workers jointly track the top
eigenspace of the Hessian by block power iteration over the same pair memory and exchange
as the secant method, and step Newton-like there and by SGD with momentum in the
complement.

Every ``probe_every`` steps (a refresh) rank r probes its k columns v of the basis V on its
minibatch, y = (grad(theta + eps v) - grad(theta)) / eps, and the slot's Allgather gives
every rank V and Y ~ H V. Rayleigh-Ritz on sym(V^T Y) gives the Ritz pairs; the next basis
is orth(Y Q) (Cholesky-QR on the Gram matrix). The pair memory holds one slot:
rows [g; per rank: k V-rows, k Y-rows]. With ``optim.exchange = "sharded"`` W, the momentum
and the Newton step are this rank's parts, and a rank's next basis columns are formed part
by part on every rank and moved to it by the exchange (``combine_to_owners``).
"""

from __future__ import annotations

import numpy as np

from hessmpi.optim.base import StepInfo
from hessmpi.optim.exchange import exchange_for
from hessmpi.optim.memory import PairMemory
from hessmpi.optim.quasi_newton import deflation
from hessmpi.optim.secant import fallback_counts, load_common


class BasisProbes:
    """The pair source of the deflated variant: on refresh steps this rank's k columns of
    the tracked basis and their finite-difference products with the batch Hessian.
    ``next_basis``: (m, m) coefficients over the last refresh's Y of the next basis (None:
    keep the basis probed last, e.g. before the first refresh: m seeded Gaussian columns,
    orthonormal by Cholesky-QR)."""

    def __init__(self, opts, *, n: int, comm, seed: int, xp, dtype, exchange):
        self.o, self.xp, self.exchange = opts, xp, exchange
        self.rank, self.contributors, self.k = comm.rank, comm.size, opts.pairs_per_rank
        m, k = self.contributors * self.k, self.k
        self.forming = False
        self.next_basis = None
        self._work = xp.zeros(n, dtype=dtype)
        self._next_v = xp.zeros((k, n), dtype=dtype)
        gauss = np.random.default_rng([seed, 7]).standard_normal((m, n))
        r = np.linalg.cholesky(gauss @ gauss.T).T
        mine = slice(k * comm.rank, k * (comm.rank + 1))
        self._next_v[...] = xp.asarray(np.linalg.solve(r.T, gauss)[mine])

    def cost(self) -> float:
        return float(self.k)

    def before_reduce(self, step: int, theta, objective, lr: float,
                      memory: PairMemory) -> None:
        xp, k = self.xp, self.k
        self.forming = step % self.o.probe_every == 0
        if not self.forming:
            return
        v_rows, y_rows = memory.own_rows(0)
        if self.next_basis is not None:   # orth(Y Q) from the last refresh's pairs
            coef = np.zeros((self.contributors * k, memory.active))
            coef[:, memory.pair_indices()[1]] = self.next_basis.T
            self.exchange.combine_to_owners(memory, coef, self._next_v)
        eps = self.o.probe_sigma * max(float(xp.linalg.norm(theta)), 1.0)
        for j in range(k):
            v_rows[j] = self._next_v[j]
            xp.multiply(v_rows[j], eps, out=self._work)
            self._work += theta
            objective.local_gradient(self._work, y_rows[j])
            y_rows[j] -= objective.grad
            y_rows[j] /= eps

    def after_reduce(self, theta, grad, memory: PairMemory, damping: float, last_step
                     ) -> int | None:
        if not self.forming:
            return None
        self.exchange.share(memory, 0)
        return memory.commit()

    def after_step(self, theta, objective, memory, last_step) -> None:
        pass


class Deflated:
    """``opts``: the typed options of ``optim.name = "deflated"``: ``pairs_per_rank`` k
    columns per rank (m = P k), ``probe_every`` T (refresh period), ``probe_sigma`` eps
    relative to max(||theta||, 1), ``lr`` eta_c of the complement, ``newton_lr`` alpha,
    ``momentum`` (complement only)."""

    def __init__(self, theta, objective, opts, *, seed: int):
        xp, n, comm = objective.xp, theta.shape[0], objective.comm
        self.o, self.xp = opts, xp
        self.exchange = x = exchange_for(opts, objective, n)
        self.source = BasisProbes(opts, n=n, comm=comm, seed=seed, xp=xp, dtype=theta.dtype,
                                  exchange=x)
        self.memory = PairMemory(n, contributors=comm.size, k=opts.pairs_per_rank, slots=1,
                                 own=comm.rank, xp=xp, dtype=theta.dtype, exchange=x)
        self.velocity = x.part(theta) * 0
        self.newton_step = x.part(theta) * 0
        self._u = x.part(theta) * 0
        self.steps = 0
        self.counts = fallback_counts()

    def state(self) -> dict:
        """The secant method's state (ring: filled, next slot, steps, 0) plus the
        coefficients of the next basis (NaN before the first refresh)."""
        m, memory = self.memory.m, self.memory
        nxt = self.source.next_basis
        ring = [memory.filled, memory.next_slot, self.steps, 0]
        return {"velocity": self.exchange.gathered(self.velocity), **memory.state(),
                "ring": np.array(ring),
                "counts": np.array(list(self.counts.values())),
                "next_basis": np.full((m, m), np.nan) if nxt is None else nxt}

    def load_state(self, state: dict, same_layout: bool) -> None:
        ring = load_common(self, state)
        if same_layout:
            self.memory.load_state(state, filled=ring[0], next_slot=ring[1])
        nxt = np.asarray(state["next_basis"])
        self.source.next_basis = nxt if same_layout and np.isfinite(nxt).all() else None

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def last_step_norm(self) -> float:
        """||theta_new - theta_old|| of the last step (momentum part + Newton part;
        sharded: a collective)."""
        return self.exchange.norm(self.velocity + self.newton_step)

    def step(self, theta, objective, lr: float) -> StepInfo:
        """Refresh (exchange the probes) or only update g's Gram row, then the deflated
        step: theta -= (momentum * v + u_comp) + u_newton, with momentum v on the
        complement part only (ALGORITHM.md s.7)."""
        xp, o, memory, source = self.xp, self.o, self.memory, self.source
        loss = objective.local_gradient(theta)
        source.before_reduce(self.steps, theta, objective, lr, memory)
        loss = objective.reduce_gradient(loss)
        grad = objective.grad_part
        slot = source.after_reduce(theta, grad, memory, 0.0, self.velocity)
        memory.set_gradient(grad)
        memory.update_gram(slot)
        v_idx, y_idx = memory.pair_indices()
        d = deflation(memory.gram_host(), v_idx, y_idx, 0, eta_c=lr, alpha=o.newton_lr)
        if source.forming:   # a failed refresh keeps the basis it probed (still in _next_v)
            source.next_basis = d.next_basis if d.reason is None else None
        v, u = self.velocity, self._u
        v *= o.momentum
        if d.reason is None:
            coef = np.zeros(memory.active)
            coef[0] = d.coef_g
            coef[v_idx] = d.coef_comp
            memory.combine(coef, out=u)
            v += u
            coef[:] = 0
            coef[v_idx] = d.coef_newton
            memory.combine(coef, out=self.newton_step)
            self.exchange.move(theta, self.newton_step, v)
        else:
            xp.multiply(grad, lr, out=u)
            v += u
            self.newton_step[...] = 0
            self.counts[d.reason] += 1
            self.exchange.move(theta, v)
        self.steps += 1
        return StepInfo(loss, fallback=int(d.reason is not None), reason=d.reason,
                        rank_kept=d.kept)
