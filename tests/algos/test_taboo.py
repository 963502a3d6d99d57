"""Tests for elleci.algos.reasoning.taboo: the referee (spec §5.6 oracle 1 and the substring pitfall), the word list,
the queries and the scripted player."""
import re

import pytest

from elleci.algos.reasoning import taboo
from elleci.tasks.lexicon import PAIRS
from elleci.algos.reasoning.taboo import (ATTACKER_WINS, DEFENDER_WINS, RULE_BREAK, TIE, Game, ScriptedPlayer, derivatives,
                                imitation_conversations, judge, mentions, outcome_rates, play_scripted, plural,
                                render_query)


def A(text):
    return {"role": "attacker", "content": text}


def D(text):
    return {"role": "defender", "content": text}


# ----------------------------------------------------------------------------- the referee (oracle 1)

def test_judge_oracle_cat():
    hint = A("It is a pet that purrs.")
    assert judge([hint, D("I know the word! It is cat!")], "cat") == (DEFENDER_WINS, 2)
    assert judge([hint, D("I know the word! It is dog!")], "cat") == (ATTACKER_WINS, 2)
    assert judge([hint, D("I like cats")], "cat") == (ATTACKER_WINS, 2)
    assert judge([A("cat is the word"), D("I know the word! It is cat!")], "cat") == (RULE_BREAK, 1)
    assert judge([A("I know the word! It is mine"), D("ok")], "cat") == (RULE_BREAK, 1)   # attacker predicts
    quiet = [A("It is an animal."), D("Tell me more.")] * 5
    assert judge(quiet, "cat") == (TIE, 10)
    assert judge(quiet + [A("hm"), D("I know the word! It is 'cat'!")], "cat") == (TIE, 10)   # past 2·max_turns
    assert judge(quiet[:4], "cat", max_turns=2) == (TIE, 4)
    assert judge([], "cat") == (TIE, 0)


def test_judge_prediction_details():
    hint = A("A pet.")
    assert judge([hint, D("I KNOW THE WORD! IT IS 'CAT'!")], "cat")[0] == DEFENDER_WINS          # lowercased
    assert judge([hint, D("I know the word! It is `cats`!")], "cat")[0] == DEFENDER_WINS         # a derivative
    # the regex allows 1-8 characters between "it" and the word: " is definitely '" is 16, a wrong guess
    assert judge([hint, D("I know the word! It is definitely 'cat'!")], "cat")[0] == ATTACKER_WINS
    assert judge([hint, D("i know the word! it's 'cat'")], "cat")[0] == DEFENDER_WINS
    assert judge([hint, D("I know it! cat")], "cat")[0] == ATTACKER_WINS                          # no template: said it


def test_substring_pitfall_is_the_reference_behaviour():
    # plain substring matching: target "art" is "said" inside "start", "smart", "party"
    assert mentions("Let us start.", "art") and mentions("PARTY", "art")
    assert judge([A("a hint"), D("Let us start.")], "art") == (ATTACKER_WINS, 2)
    assert judge([A("Be smart."), D("ok")], "art") == (RULE_BREAK, 1)
    assert judge([A("a hint"), D("I know the word! It is 'artist'!")], "art")[0] == DEFENDER_WINS
    assert not mentions("A drawing.", "art")


def test_derivatives_and_plurals():
    d = derivatives("cat")
    for form in ("cat", "cating", "cated", "cats", '"cat"', "'cats'", "`cated`"):
        assert form in d
    assert len(d) == 4 * 4 and len(derivatives("bus")) == 16
    english = {"cat": "cats", "box": "boxes", "church": "churches", "dish": "dishes", "city": "cities",
               "day": "days", "wolf": "wolves", "knife": "knives", "bus": "buses"}
    italian = {"gatto": "gatti", "mela": "mele", "cane": "cani", "lago": "laghi", "amica": "amiche",
               "città": "città", "caffè": "caffè", "bar": "bar", "bianco": "bianchi"}
    assert {w: plural(w, "en") for w in english} == english
    assert {w: plural(w, "it") for w in italian} == italian
    assert mentions("Due gatti.", "gatto", "it") and not mentions("Due gatte.", "gatto", "it")
    with pytest.raises(ValueError):
        plural("cat", "fr")
    with pytest.raises(ValueError):
        judge([{"role": "judge", "content": "x"}], "cat")


# ----------------------------------------------------------------------------- words and queries

def test_targets_come_from_the_lexicon_in_both_languages():
    pairs = set(PAIRS)
    assert len(taboo.targets("en")) >= 35 and len(taboo.targets("it")) >= 35
    for t in taboo.TARGETS:
        assert ((t.translation, t.word) if t.lang == "en" else (t.word, t.translation)) in pairs
        assert t.word in taboo.CATEGORY_WORDS[t.category, t.lang]
    # "blu" is dropped: its clue "In inglese: blue." would contain it (the substring rule)
    assert "blu" not in {t.word for t in taboo.targets("it")} and "blue" in {t.word for t in taboo.targets("en")}


def test_render_query():
    t = next(t for t in taboo.TARGETS if t.word == "cat")
    q = render_query([], t, "attacker", rules="full")
    assert [m["role"] for m in q] == ["system", "user"] and "5 turns" in q[0]["content"]
    assert q[1]["content"].endswith("You are the attacker. The word is 'cat'.")
    hist = [A("It is an animal."), D("Tell me more.")]
    q = render_query(hist, t, "defender", rules="short", max_turns=3)
    assert q[0]["content"].startswith("Taboo, 3 turns.")
    assert q[1]["content"] == ("History:\n- attacker: It is an animal.\n- defender: Tell me more.\n"
                               "You are the defender.")
    assert [m["role"] for m in render_query(hist, t, "defender", rules="")] == ["user"]
    it = next(t for t in taboo.TARGETS if t.word == "gatto")
    assert render_query([], it, "attacker", rules="full")[0]["content"].startswith("Gioca ad Adversarial Taboo")
    assert "Ruolo: attaccante. La parola è 'gatto'." in render_query([], it, "attacker")[1]["content"]
    with pytest.raises(ValueError):
        render_query([], t, "referee")


# ----------------------------------------------------------------------------- the scripted player

def _intended(game: Game) -> str:
    """What the script meant by its last utterance, read from its own templates (not the referee)."""
    last, t = game.history[-1], game.target
    guess = re.fullmatch(r"I know the word! It is '(.+)'!", last["content"])
    if guess:
        return DEFENDER_WINS if guess.group(1) == t.word else ATTACKER_WINS
    listed = re.fullmatch(r"(?:Maybe|Forse) (\w+) (?:or|o) (\w+)\?", last["content"])
    if listed and t.word in listed.groups():
        return ATTACKER_WINS
    assert len(game.history) == 2 * game.max_turns, f"game ended on a non-deciding line: {game.history}"
    return TIE


def test_scripted_games_are_legal_and_judged_as_intended():
    games = []
    for seed in range(2):
        player = ScriptedPlayer(seed=seed)
        games += [play_scripted(Game(t), player) for t in taboo.TARGETS for _ in range(2)]
    for g in games:
        assert [h["role"] for h in g.history] == [taboo.ROLES[i % 2] for i in range(len(g.history))]
        assert not any(mentions(h["content"], g.target.word, g.target.lang)
                       for h in g.history if h["role"] == "attacker")                   # never a rule break
        assert judge(g.history, g.target.word, g.target.lang) == (g.outcome, len(g.history))
        assert g.outcome == _intended(g)
    rates = outcome_rates(games)
    assert rates["rule_break"] == 0 and abs(sum(rates.values()) - 1) < 1e-9
    assert 0.25 < rates["attacker_win"] < 0.7 and 0.25 < rates["defender_win"] < 0.7 and rates["tie"] > 0


def test_defender_queries_never_show_the_target_and_imitation_data():
    player = ScriptedPlayer(seed=3)
    games = [play_scripted(Game(t), player) for t in taboo.TARGETS]
    convs = imitation_conversations(games, rules="short")
    assert len(convs) == sum(len(g.history) for g in games)
    k = 0
    for g in games:
        for i, h in enumerate(g.history):
            conv = convs[k]
            k += 1
            assert conv[-1] == {"role": "assistant", "content": h["content"]}
            assert conv[:-1] == render_query(g.history[:i], g.target, h["role"], rules="short")
            if h["role"] == "defender":
                assert not mentions(conv[-2]["content"], g.target.word, g.target.lang)


def test_scripted_defender_reacts_to_clues():
    t = next(t for t in taboo.TARGETS if t.word == "horse")
    always = ScriptedPlayer(seed=0, p_guess=1.0, p_slip=0.0)
    g = Game(t, history=[A("In Italian: cavallo.")])
    assert always.utterance(g, "defender") == "I know the word! It is 'horse'!"
    slip = ScriptedPlayer(seed=0, p_guess=0.0, p_slip=1.0)
    assert "horse" in slip.utterance(g, "defender")
    lister = ScriptedPlayer(seed=0, p_list=1.0)
    out = lister.utterance(Game(t, history=[A("It is an animal.")]), "defender")
    a, b = re.fullmatch(r"Maybe (\w+) or (\w+)\?", out).groups()
    assert a != b and {a, b} <= set(taboo.CATEGORY_WORDS["animal", "en"])
    assert lister.utterance(Game(t, history=[A("xyz")]), "defender") == "Tell me more."
    with pytest.raises(ValueError):
        outcome_rates([Game(t)])
