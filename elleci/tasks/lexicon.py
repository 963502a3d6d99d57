"""A bilingual Italian–English lexicon of common single words, for cross-lingual alignment (TLI).

`PAIRS` holds (italian, english) translation pairs: lowercase, single words, mostly nouns, with some
verbs (infinitive) and adjectives (masculine singular). The list is one-to-one: no Italian word and no
English word occurs twice, words spelled the same in both languages ("radio", "pizza", "zero") are left
out, and an English word with two senses appears once only (e.g. "fly" is `volare`, so `mosca` is out;
"light" is `luce`, so `leggero` is out). The 15 pairs of `corpus.WORDS` are included.

Split (like the TLI paper's 623 training / 63 unseen control pairs, arXiv 2506.15415): the pairs are
shuffled with `random.Random(SPLIT_SEED)` and the first `round(0.1 * len(PAIRS))` become `CONTROL_PAIRS`,
the rest `TRAIN_PAIRS` (each kept in lexicon order). `random_pairs` builds the mismatched baseline.

The lexicon is validated at import (cheap: sets over a few hundred strings).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

SPLIT_SEED = 2506          # the TLI paper's arXiv month; fixed so the split never changes
CONTROL_FRACTION = 0.1

_RAW = """
cane dog|gatto cat|cavallo horse|mucca cow|maiale pig|pecora sheep|capra goat|topo mouse|uccello bird
pesce fish|leone lion|tigre tiger|orso bear|lupo wolf|volpe fox|coniglio rabbit|serpente snake|rana frog
ape bee|formica ant|farfalla butterfly|elefante elephant|scimmia monkey|balena whale|ragno spider|madre mother
padre father|fratello brother|sorella sister|figlio son|figlia daughter|zio uncle|marito husband|moglie wife
bambino child|uomo man|donna woman|ragazzo boy|ragazza girl|amico friend|nemico enemy|re king|regina queen
medico doctor|insegnante teacher|testa head|mano hand|piede foot|occhio eye|orecchio ear|naso nose|bocca mouth
dente tooth|braccio arm|gamba leg|cuore heart|sangue blood|osso bone|pelle skin|dito finger|faccia face
casa house|porta door|finestra window|tetto roof|muro wall|letto bed|sedia chair|tavolo table|cucina kitchen
chiave key|specchio mirror|giardino garden|forno oven|piatto plate|bicchiere glass|coltello knife|tazza cup
bottiglia bottle|scatola box|borsa bag|pane bread|acqua water|latte milk|vino wine|birra beer|formaggio cheese
carne meat|uovo egg|burro butter|sale salt|zucchero sugar|riso rice|mela apple|pera pear|fragola strawberry
limone lemon|patata potato|pomodoro tomato|carota carrot|miele honey|olio oil|zuppa soup|torta cake
caffè coffee|tè tea|cioccolato chocolate|cena dinner|cibo food|sole sun|luna moon|stella star|cielo sky
nuvola cloud|pioggia rain|neve snow|vento wind|fuoco fire|terra earth|mare sea|fiume river|lago lake
montagna mountain|foresta forest|albero tree|fiore flower|erba grass|foglia leaf|pietra stone|isola island
spiaggia beach|ghiaccio ice|onda wave|deserto desert|campo field|fumo smoke|aria air|oro gold|argento silver
ferro iron|legno wood|carta paper|giorno day|notte night|mattina morning|sera evening|mese month|anno year
oggi today|domani tomorrow|ieri yesterday|estate summer|inverno winter|primavera spring|autunno autumn
lunedì monday|martedì tuesday|mercoledì wednesday|giovedì thursday|venerdì friday|sabato saturday
domenica sunday|uno one|due two|tre three|quattro four|cinque five|sei six|sette seven|otto eight|nove nine
dieci ten|venti twenty|rosso red|verde green|giallo yellow|nero black|bianco white|blu blue|grigio grey
marrone brown|viola purple|rosa pink|arancione orange|città city|strada road|scuola school|chiesa church
ospedale hospital|negozio shop|mercato market|ponte bridge|torre tower|castello castle|villaggio village
paese country|stazione station|banca bank|parco park|macchina car|treno train|aereo plane|barca boat|nave ship
ruota wheel|libro book|penna pen|lettera letter|telefono telephone|cappello hat|scarpa shoe|camicia shirt
cappotto coat|anello ring|spada sword|corda rope|moneta coin|soldi money|regalo gift|giocattolo toy|palla ball
mappa map|quadro painting|canzone song|musica music|gioco game|storia story|lavoro work|parola word|nome name
voce voice|domanda question|risposta answer|sogno dream|pace peace|guerra war|amore love|paura fear
verità truth|bugia lie|vita life|morte death|fame hunger|sete thirst|forza strength|colore colour
numero number|luce light|ombra shadow|mondo world|sorriso smile|bacio kiss|festa party|mangiare eat|bere drink
dormire sleep|correre run|camminare walk|parlare speak|ascoltare listen|vedere see|guardare watch|sentire hear
leggere read|scrivere write|cantare sing|ballare dance|nuotare swim|volare fly|aprire open|chiudere close
comprare buy|vendere sell|dare give|prendere take|andare go|venire come|sapere know|pensare think
capire understand|odiare hate|aiutare help|trovare find|perdere lose|vincere win|giocare play|pulire clean
lavare wash|tagliare cut|spingere push|cadere fall|ridere laugh|piangere cry|dimenticare forget
ricordare remember|imparare learn|insegnare teach|chiedere ask|morire die|vivere live|aspettare wait
cominciare begin|finire finish|pagare pay|volere want|dire say|sperare hope|credere believe|grande big
piccolo small|alto tall|basso short|lungo long|nuovo new|vecchio old|giovane young|bello beautiful|brutto ugly
buono good|cattivo bad|caldo hot|freddo cold|felice happy|triste sad|veloce fast|lento slow|forte strong
debole weak|ricco rich|povero poor|pieno full|vuoto empty|sporco dirty|facile easy|difficile difficult
dolce sweet|amaro bitter|pesante heavy|stanco tired|malato sick|pazzo crazy|gentile kind|duro hard
morbido soft|largo wide|stretto narrow|profondo deep|secco dry|bagnato wet|vero true|falso false
sbagliato wrong|ultimo last|primo first|intero whole|pericoloso dangerous|strano strange|silenzioso quiet
rumoroso noisy|coraggioso brave|pigro lazy|magro thin|grasso fat|affamato hungry|cieco blind|sordo deaf
vivo alive|morto dead|maturo ripe|crudo raw|chiaro clear|scuro dark|antico ancient
"""

PAIRS: tuple[tuple[str, str], ...] = tuple(
    tuple(item.split()) for line in _RAW.strip().splitlines() for item in line.split("|"))


def check_pairs(pairs: Sequence[tuple[str, str]]) -> None:
    """Raise ValueError, naming the offender, unless `pairs` is a one-to-one list of lowercase words."""
    seen_it: set[str] = set()
    seen_en: set[str] = set()
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pairs[{i}] = {pair!r} is not an (italian, english) pair")
        it, en = pair
        for word in (it, en):
            if not word or not word.isalpha() or word != word.lower():
                raise ValueError(f"pairs[{i}] = {pair!r}: {word!r} is not a single lowercase word")
        if it == en:
            raise ValueError(f"pairs[{i}] = {pair!r}: same spelling in both languages")
        if it in seen_it:
            raise ValueError(f"pairs[{i}]: italian word {it!r} occurs twice")
        if en in seen_en:
            raise ValueError(f"pairs[{i}]: english word {en!r} occurs twice")
        seen_it.add(it)
        seen_en.add(en)


def split_pairs(pairs: Sequence[tuple[str, str]], seed: int = SPLIT_SEED,
                control_fraction: float = CONTROL_FRACTION) -> tuple[tuple, tuple]:
    """(train, control): a seeded shuffle picks round(fraction·n) control pairs; both keep input order."""
    if not 0.0 < control_fraction < 1.0:
        raise ValueError(f"control_fraction must be in (0, 1), got {control_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    control = set(order[:round(control_fraction * len(pairs))])
    train = tuple(p for i, p in enumerate(pairs) if i not in control)
    return train, tuple(p for i, p in enumerate(pairs) if i in control)


def random_pairs(pairs: Sequence[tuple[str, str]], seed: int = 0) -> tuple[tuple[str, str], ...]:
    """Mismatched (italian, english) pairs: the English side permuted by a random derangement.

    Sattolo's algorithm draws a uniformly random *cyclic* permutation σ, so σ(i) ≠ i for every i: each
    Italian word is paired with some other pair's English word, never with its own translation (for a
    one-to-one list). Deterministic for a given seed. Needs at least 2 pairs.
    """
    n = len(pairs)
    if n < 2:
        raise ValueError(f"random_pairs needs at least 2 pairs to derange, got {n}")
    rng = random.Random(seed)
    sigma = list(range(n))
    for i in range(n - 1, 0, -1):            # Sattolo: j < i strictly, which makes one n-cycle
        j = rng.randrange(i)
        sigma[i], sigma[j] = sigma[j], sigma[i]
    return tuple((pairs[i][0], pairs[sigma[i]][1]) for i in range(n))


check_pairs(PAIRS)
if not 300 <= len(PAIRS) <= 400:
    raise ValueError(f"the lexicon should hold 300-400 pairs, has {len(PAIRS)}")
TRAIN_PAIRS, CONTROL_PAIRS = split_pairs(PAIRS)

__all__ = ["PAIRS", "TRAIN_PAIRS", "CONTROL_PAIRS", "SPLIT_SEED", "CONTROL_FRACTION", "check_pairs",
           "split_pairs", "random_pairs"]
