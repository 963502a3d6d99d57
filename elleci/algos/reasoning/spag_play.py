"""SPAG episode collection and rewards: two players play Adversarial Taboo, the winners' utterances become
weighted training samples.

SPAG (Cheng et al., NeurIPS 2024, https://arxiv.org/abs/2404.10642; code Linear95/SPAG, tools/play_llm_game.py
and tools/assign_rewards.py). The game and its referee are `elleci.algos.reasoning.taboo`.

    player = ModelPlayer(model, tok, temperature=1.2, max_new_tokens=24, rules="short")
    games = play_games(player, player, [Game(t) for t in targets], seed=0)      # one model, both roles
    samples, stats = episode_samples(games, decay=0.8, rules="short")            # winners' utterances only

Rewards (`compute_self_play_sample_rewards`): ties and rule breaks are dropped; the winner of a game gets
total reward 1 over its k utterances, reward_i = c_i / Σ_j c_j with c_i = (1/γ)^i (later moves more);
each sample is weighted by its role, w_att = N / (2·N_att_wins), w_def = N / (2·N_def_wins), N = N_att_wins +
N_def_wins, so that each role contributes ½ in expectation.

Glossary: γ `decay` (0.8); k the winner's utterances in one game; N_att_wins, N_def_wins the games won by
each role among the N decided ones.

A player is any object with `act(games, role, *, seed) -> list[str]`: one utterance of `role` per game
(`ModelPlayer` for any model with ElleciLM's generation interface, `taboo.ScriptedPlayer`, or your own).

Differences from the reference:
1. A game stops as soon as the referee decides it (the reference early-stops on predictions only and judges
   afterwards). The outcome and the samples are the same: both read the history up to the first event.
2. Training queries use the same rendering as playing (`taboo.render_query`); the reference re-renders them
   with randomised rule paraphrases and speaker labels.
3. All games of a turn are sampled in one batch from one seeded generator (`complete`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from elleci.algos.reasoning import taboo
from elleci.algos.sampling import complete, prompt_ids


class Player(Protocol):
    def act(self, games: Sequence[taboo.Game], role: str, *, seed: int) -> list[str]:
        """One utterance of `role` for each game, in order."""


class ModelPlayer:
    """A language model as a player: renders each game's query (`taboo.render_query`) and samples one
    utterance per game in batches (temperature 0 = greedy). The same object can play both roles."""

    def __init__(self, model, tokenizer, *, temperature: float = 1.2, max_new_tokens: int = 24,
                 rules: str = "full", top_p: float | None = None, batch_size: int = 64):
        if temperature < 0 or max_new_tokens < 1:
            raise ValueError(f"need temperature >= 0 and max_new_tokens >= 1, got {temperature}, {max_new_tokens}")
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.temperature, self.max_new_tokens, self.top_p, self.batch_size = (temperature, max_new_tokens, top_p,
                                                                              batch_size)

    def queries(self, games: Sequence[taboo.Game], role: str) -> list[list[dict]]:
        return [taboo.render_query(g.history, g.target, role, max_turns=g.max_turns, rules=self.rules) for g in games]

    def act(self, games: Sequence[taboo.Game], role: str, *, seed: int = 0) -> list[str]:
        if not games:
            return []
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed) if self.temperature > 0 else None
        ids = prompt_ids(self.tokenizer, self.queries(games, role))
        texts = complete(self.model, self.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                         temperature=self.temperature, top_p=self.top_p, generator=gen, batch_size=self.batch_size)
        return [t.strip() for t in texts]


def play_games(attacker: Player, defender: Player, games: Sequence[taboo.Game], *, seed: int = 0
               ) -> list[taboo.Game]:
    """Play every game to its end (in place; also returned). Turn t: the role to speak in every unfinished
    game acts in one call; the referee judges each new utterance; a game ends at the first event or after
    2·max_turns utterances (a tie)."""
    games = list(games)
    if any(g.history or g.outcome is not None for g in games):
        raise ValueError("play_games needs fresh games (empty history, no outcome)")
    for turn in range(2 * max((g.max_turns for g in games), default=0)):
        active = [g for g in games if g.outcome is None]
        if not active:
            break
        role = taboo.ROLES[turn % 2]
        player = attacker if role == "attacker" else defender
        utterances = player.act(active, role, seed=seed * 1000 + turn)
        if len(utterances) != len(active):
            raise ValueError(f"{role} returned {len(utterances)} utterances for {len(active)} games")
        for g, text in zip(active, utterances):
            g.history.append({"role": role, "content": text})
            event = taboo.utterance_event(role, text, g.target.word, g.target.lang)
            if event is not None or len(g.history) >= 2 * g.max_turns:
                g.outcome = event or taboo.TIE
    return games


# ----------------------------------------------------------------------------- rewards

def decayed_rewards(k: int, decay: float = 0.8) -> list[float]:
    """reward_i = c_i / Σ_j c_j, c_i = (1/γ)^i, i = 1..k: one game's unit reward over the winner's k moves."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay γ must be in (0, 1], got {decay}")
    c = [(1 / decay) ** i for i in range(1, k + 1)]
    return [ci / sum(c) for ci in c]


def role_weights(attacker_wins: int, defender_wins: int) -> tuple[float, float]:
    """(w_att, w_def) = (N / (2·N_att), N / (2·N_def)), N = N_att + N_def; 0 for a role with no win."""
    if attacker_wins < 0 or defender_wins < 0:
        raise ValueError(f"win counts must be >= 0, got {attacker_wins}, {defender_wins}")
    n = attacker_wins + defender_wins
    return (n / (2 * attacker_wins) if attacker_wins else 0.0, n / (2 * defender_wins) if defender_wins else 0.0)


def episode_samples(games: Sequence[taboo.Game], *, decay: float = 0.8, rules: str = "full"
                    ) -> tuple[list[dict], dict]:
    """(samples, stats): one sample per utterance of each game's winner, {"prompt": query messages,
    "response", "reward", "weight", "role", "target"}; ties and rule breaks give none. stats counts the
    outcomes, the samples and the role weights."""
    winners = {taboo.ATTACKER_WINS: "attacker", taboo.DEFENDER_WINS: "defender"}
    decided = [g for g in games if g.outcome in winners]
    if any(g.outcome is None for g in games):
        raise ValueError("every game must be finished before assigning rewards")
    n_att = sum(g.outcome == taboo.ATTACKER_WINS for g in decided)
    w = dict(zip(("attacker", "defender"), role_weights(n_att, len(decided) - n_att)))
    samples = []
    for g in decided:
        role = winners[g.outcome]
        moves = [i for i, h in enumerate(g.history) if h["role"] == role]
        for i, r in zip(moves, decayed_rewards(len(moves), decay)):
            samples.append({"prompt": taboo.render_query(g.history[:i], g.target, role, max_turns=g.max_turns,
                                                         rules=rules),
                            "response": g.history[i]["content"], "reward": r, "weight": w[role], "role": role,
                            "target": g.target.word})
    stats = {"games": len(games), "attacker_wins": n_att, "defender_wins": len(decided) - n_att,
             "rule_breaks": sum(g.outcome == taboo.RULE_BREAK for g in games),
             "ties": sum(g.outcome == taboo.TIE for g in games), "samples": len(samples),
             "w_att": w["attacker"], "w_def": w["defender"]}
    return samples, stats
