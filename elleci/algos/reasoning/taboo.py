"""Adversarial Taboo, the word game of SPAG (Cheng et al., NeurIPS 2024, arXiv 2404.10642; repo Linear95/SPAG).

The attacker knows a target word, the defender does not. The attacker speaks first; each turn is one
attacker then one defender utterance, `max_turns` turns (5) in all. The attacker wins when the
defender says the word unawares, or guesses wrong; it must never say the word itself. The defender
may guess once, with the template `I know the word! It is 'target word'!`; a right guess wins.

The referee (`judge`) is the reference's `get_game_outcome`, scanning the utterances in order, lowercased:

    defender, regex `i know the word! it.{1,8}` matches     -> a prediction: "defender wins" if the regex
                                                              followed by a derivative of the target
                                                              matches, else "attacker wins" (wrong guess)
    defender, a derivative is a substring (no prediction)   -> "attacker wins"
    attacker, a derivative is a substring, or a prediction  -> "attacker breaks the rules"
    2·max_turns utterances without an event                 -> "tied game"

Derivatives of w (`derivatives`): w, w+"ing", w+"ed" and `plural(w)`, each also wrapped in "", '' and ``.
Matching is a plain substring test, as in the reference, so target "art" is "said" in "start"
(tested as the reference's behaviour). The wrapped forms add nothing to a substring test; they are kept
because the reference lists them (they matter in the prediction regex only in the same redundant way).

Plurals (our own rules; the reference used TextBlob, which its public code comments out):
    English  -s/-x/-z/-ch/-sh -> +es;  consonant + y -> -ies;  -f -> -ves, -fe -> -ves;  else +s
    Italian  -co/-go -> -chi/-ghi;  -ca/-ga -> -che/-ghe;  -o -> -i;  -a -> -e;  -e -> -i;
             a final accented vowel or a consonant -> unchanged (città, caffè, bar)
They are approximations (English "sheep" -> "sheeps", Italian "uovo" -> "uovi", "amico" -> "amichi").

Target words come from the bilingual lexicon (`elleci.tasks.lexicon.PAIRS`): nine categories, each
word playable in English (clue: its Italian translation) and in Italian (clue: its English one).
A scripted player (`ScriptedPlayer`) plays legal games that a tiny model can learn to imitate:

    attacker  "It is an animal." (category clue) or "In Italian: gatto." (translation clue)
    defender  on a translation it recognises: guess it (usually), name it by mistake, or ask;
              on a category: name two words of it ("Maybe dog or cow?"), guess one, or ask;
              otherwise "Tell me more."

so each side wins some games and some are tied. The word list keeps only targets that no other
text of the clue bank contains (so every scripted game is judged as the script intends).

    game = Game(TARGETS[0]); play_scripted(game, ScriptedPlayer(seed=0))
    judge(game.history, game.target.word, game.target.lang)     # ("defender wins", 2)
    messages = render_query(game.history, game.target, "defender", rules="short")
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from elleci.tasks.lexicon import PAIRS

ROLES = ("attacker", "defender")
LANGS = ("en", "it")
ATTACKER_WINS, DEFENDER_WINS, RULE_BREAK, TIE = ("attacker wins", "defender wins", "attacker breaks the rules",
                                                 "tied game")
OUTCOMES = (ATTACKER_WINS, DEFENDER_WINS, RULE_BREAK, TIE)
PREDICTION = "I know the word! It is '{word}'!"
PREDICT_RE = r"i know the word! it.{1,8}"          # the reference's PREDICT_TEMP

RULES = {
    "en": ("Play the game of Adversarial Taboo. There are two players, an attacker and a defender. The attacker "
           "is given a target word that the defender is not told. The attacker wins if the defender says the "
           "target word without realising it; the attacker must never say the word itself, or it loses. The "
           "defender tries to work out the word; when it knows it, it says \"I know the word! It is 'target "
           "word'!\" and wins if it is right. The defender may guess only once: a wrong guess loses. The game "
           "lasts {max_turns} turns; if nobody has won by then, it is a tie."),
    "it": ("Gioca ad Adversarial Taboo. Ci sono due giocatori, un attaccante e un difensore. L'attaccante riceve "
           "una parola segreta che il difensore non conosce. L'attaccante vince se il difensore dice la parola "
           "senza accorgersene; l'attaccante non deve mai dirla, altrimenti perde. Il difensore cerca di "
           "scoprire la parola; quando la sa, dice \"I know the word! It is 'parola'!\" e vince se ha ragione. "
           "Il difensore può provare una sola volta: se sbaglia, perde. La partita dura {max_turns} turni; se "
           "nessuno vince, è un pareggio."),
}
SHORT_RULES = {
    "en": "Taboo, {max_turns} turns. Attacker: hint, never say the word. Defender: guess once.",
    "it": "Taboo, {max_turns} turni. Attaccante: suggerisci, non dire la parola. Difensore: indovina una volta.",
}
"""A one-line version of the rules for tiny models on a CPU (each character is about one token there)."""

_TEXT = {
    "en": {"attacker": "attacker", "defender": "defender", "history": "History:", "start": "The game starts.",
           "instruct_attacker": "You are the attacker. The word is '{word}'.",
           "instruct_defender": "You are the defender.",
           "category": "It is {label}.", "translation": "In Italian: {word}.", "list": "Maybe {a} or {b}?",
           "ask": "Tell me more."},
    "it": {"attacker": "attaccante", "defender": "difensore", "history": "Storia:", "start": "La partita inizia.",
           "instruct_attacker": "Ruolo: attaccante. La parola è '{word}'.",
           "instruct_defender": "Ruolo: difensore.",
           "category": "È {label}.", "translation": "In inglese: {word}.", "list": "Forse {a} o {b}?",
           "ask": "Dimmi di più."},
}

_CATEGORIES = {   # key: ((english label, italian label), english words; every word is a lexicon pair)
    "animal": (("an animal", "un animale"), "dog cat horse cow pig sheep bird fish"),
    "food": (("a food", "un cibo"), "bread water milk wine apple cheese egg cake"),
    "place": (("a place", "un luogo"), "house school city road church shop bridge village"),
    "nature": (("in nature", "in natura"), "sun moon tree river sea lake mountain flower"),
    "thing": (("a thing", "una cosa"), "book pen key cup box bag bottle chair"),
    "person": (("a person", "una persona"), "friend mother father brother sister doctor teacher child"),
    "number": (("a number", "un numero"), "one two three four five six seven eight nine ten"),
    "day": (("a day", "un giorno"), "monday tuesday wednesday thursday friday saturday sunday"),
    "colour": (("a colour", "un colore"), "red green yellow black white brown pink orange blue"),
}


# ----------------------------------------------------------------------------- the referee

def plural(word: str, lang: str = "en") -> str:
    """The plural by the simple rules of the module docstring (lowercase in, lowercase out)."""
    _check_lang(lang)
    w = word.lower()
    if not w:
        raise ValueError("plural of an empty word")
    if lang == "en":
        if w.endswith(("s", "x", "z", "ch", "sh")):
            return w + "es"
        if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
            return w[:-1] + "ies"
        if w.endswith("fe"):
            return w[:-2] + "ves"
        if w.endswith("f"):
            return w[:-1] + "ves"
        return w + "s"
    for end, new in (("co", "chi"), ("go", "ghi"), ("ca", "che"), ("ga", "ghe"), ("o", "i"), ("a", "e"), ("e", "i")):
        if w.endswith(end):
            return w[: -len(end)] + new
    return w                                              # accented vowel or consonant: invariable


def derivatives(word: str, lang: str = "en") -> list[str]:
    """w, w+ing, w+ed, plural(w), each also wrapped in "", '' and `` (all lowercase)."""
    w = word.lower()
    forms = list(dict.fromkeys([w, w + "ing", w + "ed", plural(w, lang)]))
    return forms + [q + f + q for f in forms for q in ('"', "'", "`")]


def mentions(text: str, word: str, lang: str = "en") -> bool:
    """True when a derivative of `word` is a substring of `text` (lowercased): the reference's plain test."""
    low = text.lower()
    return any(d in low for d in derivatives(word, lang))


def is_prediction(text: str) -> bool:
    return re.search(PREDICT_RE, text.lower()) is not None


def is_correct_prediction(text: str, word: str, lang: str = "en") -> bool:
    low = text.lower()
    return any(re.search(PREDICT_RE + re.escape(d), low) for d in derivatives(word, lang))


def utterance_event(role: str, text: str, word: str, lang: str = "en") -> str | None:
    """The outcome one utterance decides (`judge`'s rules for a single line), or None when the game goes on."""
    if role == "defender":
        if is_prediction(text):
            return DEFENDER_WINS if is_correct_prediction(text, word, lang) else ATTACKER_WINS
        return ATTACKER_WINS if mentions(text, word, lang) else None
    if role == "attacker":
        return RULE_BREAK if mentions(text, word, lang) or is_prediction(text) else None
    raise ValueError(f"role={role!r}; expected one of {ROLES}")


def judge(history: Sequence[dict], word: str, lang: str = "en", max_turns: int = 5) -> tuple[str, int]:
    """(outcome, utterances read) of a game history [{"role", "content"}, ...] (the reference's
    `get_game_outcome`): the first deciding utterance, else "tied game" after 2·max_turns utterances."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    n = 0
    for n, item in enumerate(history[: 2 * max_turns], start=1):
        event = utterance_event(item["role"], item["content"], word, lang)
        if event is not None:
            return event, n
    return TIE, n


# ----------------------------------------------------------------------------- target words

@dataclass(frozen=True)
class Target:
    """A target word in its game language, with the clue bank entries the scripted attacker uses."""
    word: str
    lang: str
    translation: str
    category: str


@dataclass
class Game:
    """One game: the target, the utterances so far and, once decided, the outcome (None while playing)."""
    target: Target
    max_turns: int = 5
    history: list[dict] = field(default_factory=list)
    outcome: str | None = None

    @property
    def next_role(self) -> str:
        return ROLES[len(self.history) % 2]


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang={lang!r}; expected one of {LANGS}")


def category_label(category: str, lang: str) -> str:
    return _CATEGORIES[category][0][LANGS.index(lang)]


def _category_words() -> dict[tuple[str, str], list[str]]:
    """(category, lang) -> words, from the lexicon pairs (error if a listed word is not in it)."""
    it_of = {en: it for it, en in PAIRS}
    out = {}
    for cat, (_, words) in _CATEGORIES.items():
        missing = [w for w in words.split() if w not in it_of]
        if missing:
            raise ValueError(f"category {cat!r}: {missing} not in the lexicon")
        out[cat, "en"] = words.split()
        out[cat, "it"] = [it_of[w] for w in words.split()]
    return out


def _scripted_texts(t: Target, words: list[str]) -> list[str]:
    """Every utterance the scripted players can produce in a game on `t`, except the target's own guess
    and lists that include the target (those are meant to decide the game)."""
    text = _TEXT[t.lang]
    others = [w for w in words if w != t.word]
    return ([text["category"].format(label=category_label(t.category, t.lang)),
             text["translation"].format(word=t.translation), text["ask"]]
            + [text["list"].format(a=a, b=b) for a in others for b in others if a != b]
            + [PREDICTION.format(word=w) for w in others])


def build_targets() -> tuple[Target, ...]:
    """Every (word, language) whose derivatives occur in no scripted text of its game (see `_scripted_texts`)."""
    by_cat, out = _category_words(), []
    for (cat, lang), words in by_cat.items():
        other = by_cat[cat, "en" if lang == "it" else "it"]
        for word, translation in zip(words, other):
            t = Target(word, lang, translation, cat)
            if not any(mentions(s, word, lang) for s in _scripted_texts(t, words)):
                out.append(t)
    return tuple(sorted(out, key=lambda t: (t.lang, t.category, t.word)))


CATEGORY_WORDS = _category_words()
TARGETS = build_targets()
"""The playable targets: about 70 words in each language."""


def targets(lang: str | None = None) -> list[Target]:
    if lang is not None:
        _check_lang(lang)
    return [t for t in TARGETS if lang is None or t.lang == lang]


# ----------------------------------------------------------------------------- queries

def rules_text(rules: str, lang: str, max_turns: int) -> str:
    """"full" (RULES), "short" (SHORT_RULES), "" (none) or any custom text ({max_turns} is filled in)."""
    text = {"full": RULES, "short": SHORT_RULES}.get(rules, {lang: rules})[lang]
    return text.format(max_turns=max_turns) if "{max_turns}" in text else text


def render_query(history: Sequence[dict], target: Target, role: str, *, max_turns: int = 5,
                 rules: str = "full") -> list[dict]:
    """Chat messages for the next utterance of `role`: [system: rules] + [user: history + role instruction]
    (the reference's `convert_game_history_to_query`, as chat). Only the attacker's instruction names
    the target."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; expected one of {ROLES}")
    _check_lang(target.lang)
    text = _TEXT[target.lang]
    if history:
        lines = [text["history"]] + [f"- {text[h['role']]}: {h['content']}" for h in history]
    else:
        lines = [text["start"]]
    lines.append(text[f"instruct_{role}"].format(word=target.word))
    system = rules_text(rules, target.lang, max_turns)
    user = {"role": "user", "content": "\n".join(lines)}
    return ([{"role": "system", "content": system}] if system else []) + [user]


# ----------------------------------------------------------------------------- the scripted player

def _recognise(game: Game) -> tuple[str | None, str | None]:
    """(word whose translation the attacker gave, category of the clue): a translation anywhere in the
    attacker's utterances (latest first) wins over a category label; (None, None) when there is neither."""
    lang = game.target.lang
    said = [h["content"].lower() for h in reversed(game.history) if h["role"] == "attacker"]
    for content in said:
        for cat in _CATEGORIES:
            other = CATEGORY_WORDS[cat, "en" if lang == "it" else "it"]
            for word, translation in zip(CATEGORY_WORDS[cat, lang], other):
                if re.search(rf"\b{re.escape(translation)}\b", content):
                    return word, cat
    for content in said:
        for cat in _CATEGORIES:
            if category_label(cat, lang) in content:
                return None, cat
    return None, None


@dataclass
class ScriptedPlayer:
    """A rule-based player of either role (the `Player` interface of `elleci.algos.reasoning.spag_play`).

    Attacker: a translation clue with probability p_translate_first on turn 1, p_translate later, else the
    category clue. Defender, on the latest recognised clue:
        translation of w   guess w (p_guess), name w in a list by mistake (p_slip), else ask;
        category only      list two of its words (p_list), guess one of them (p_blind_guess), else ask;
        nothing            ask.
    Lists avoid words already named in the game. Deterministic given `seed` and the call sequence."""
    seed: int = 0
    p_translate_first: float = 0.2
    p_translate: float = 0.4
    p_guess: float = 0.7
    p_slip: float = 0.2
    p_list: float = 0.4
    p_blind_guess: float = 0.15

    def __post_init__(self):
        self.rng = random.Random(f"taboo-scripted/{self.seed}")

    def act(self, games: Sequence[Game], role: str, *, seed: int | None = None) -> list[str]:
        """One utterance of `role` for each game (`seed` is ignored: the player keeps its own stream)."""
        return [self.utterance(g, role) for g in games]

    def utterance(self, game: Game, role: str) -> str:
        t, text = game.target, _TEXT[game.target.lang]
        if role == "attacker":
            first = not game.history
            if self.rng.random() < (self.p_translate_first if first else self.p_translate):
                return text["translation"].format(word=t.translation)
            return text["category"].format(label=category_label(t.category, t.lang))
        if role != "defender":
            raise ValueError(f"role={role!r}; expected one of {ROLES}")
        known, cat = _recognise(game)
        u = self.rng.random()
        if known is not None:
            if u < self.p_guess:
                return PREDICTION.format(word=known)
            if u < self.p_guess + self.p_slip:
                other = self._pick(game, cat, exclude={known}, k=1)
                return text["list"].format(**dict(zip("ab", self.rng.sample([known] + other, 2))))
            return text["ask"]
        if cat is not None:
            if u < self.p_list:
                a, b = self._pick(game, cat, exclude=set(), k=2)
                return text["list"].format(a=a, b=b)
            if u < self.p_list + self.p_blind_guess:
                return PREDICTION.format(word=self._pick(game, cat, exclude=set(), k=1)[0])
        return text["ask"]

    def _pick(self, game: Game, cat: str, exclude: set, k: int) -> list[str]:
        said = {w for h in game.history if h["role"] == "defender" for w in re.findall(r"\w+", h["content"].lower())}
        pool = [w for w in CATEGORY_WORDS[cat, game.target.lang] if w not in exclude and w not in said]
        pool = pool if len(pool) >= k else [w for w in CATEGORY_WORDS[cat, game.target.lang] if w not in exclude]
        return self.rng.sample(pool, k)


def play_scripted(game: Game, player: ScriptedPlayer) -> Game:
    """Play `game` to its end with `player` in both roles (the referee decides after each utterance)."""
    while game.outcome is None:
        role = game.next_role
        game.history.append({"role": role, "content": player.utterance(game, role)})
        event = utterance_event(role, game.history[-1]["content"], game.target.word, game.target.lang)
        if event is not None or len(game.history) >= 2 * game.max_turns:
            game.outcome = event or TIE
    return game


def imitation_conversations(games: Sequence[Game], *, rules: str = "full") -> list[list[dict]]:
    """Every utterance of every game as a chat example: the query messages, then the utterance as the
    assistant turn (both roles; the imitation data of SPAG's first stage)."""
    out = []
    for g in games:
        for i, h in enumerate(g.history):
            query = render_query(g.history[:i], g.target, h["role"], max_turns=g.max_turns, rules=rules)
            out.append(query + [{"role": "assistant", "content": h["content"]}])
    return out


def outcome_rates(games: Sequence[Game]) -> dict[str, float]:
    """Fraction of games per outcome: {"attacker_win", "defender_win", "rule_break", "tie"}."""
    if not games:
        raise ValueError("outcome_rates needs at least one game")
    if any(g.outcome is None for g in games):
        raise ValueError("every game must be finished (outcome set) before counting outcomes")
    keys = dict(zip(OUTCOMES, ("attacker_win", "defender_win", "rule_break", "tie")))
    return {keys[o]: sum(g.outcome == o for g in games) / len(games) for o in OUTCOMES}
