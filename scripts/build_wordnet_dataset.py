"""Build slimtune's shipped datasets (deterministic for a given --seed).

  wordnet_instruct/  English alpaca JSONL from WordNet 3.0 (Debian `wordnet-base`)
  tang300_zh/        Chinese check set from the Tang 300 poems (Debian `fortunes-zh`)

Get the sources without installing anything system-wide:
    cd /tmp && apt-get update && apt-get download wordnet-base fortunes-zh \
      && dpkg-deb -x wordnet-base_*.deb wn && dpkg-deb -x fortunes-zh_*.deb fz
    python scripts/build_wordnet_dataset.py --wordnet /tmp/wn --fortunes /tmp/fz

WordNet rows: for common lemmas (WordNet's tagged-sense count >= --min-tagged) we take the most
frequent sense (first synset listed in index.<pos>) and write one of four instructions per lemma:
meaning ("What does the word X mean?"), usage ("Use the word X in a sentence." -> a WordNet example
containing X), meaning in context (alpaca "### Input:" variant: the example sentence as input) and
synonym. Train and eval lemmas are disjoint.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

POS_FILES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
ASSETS = Path(__file__).resolve().parent.parent / "src" / "slimtune" / "assets"


@dataclass(frozen=True)
class Sense:
    lemma: str
    pos: str
    definition: str
    examples: tuple[str, ...]
    synonyms: tuple[str, ...]


def _clean_word(word: str) -> str:
    return re.sub(r"\(.*?\)$", "", word).replace("_", " ")


def parse_data_line(line: str, pos: str) -> tuple[str, Sense] | None:
    """One data.<pos> line -> (offset, Sense of its first lemma); gloss is 'definition; "example"'."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    words = [_clean_word(fields[4 + 2 * i]) for i in range(count)]
    parts = [p.strip() for p in gloss.strip().split(";")]
    definition = next((p for p in parts if p and not p.startswith('"')), "")
    examples = tuple(p.strip('"').strip() for p in parts if p.startswith('"') and p.endswith('"'))
    if not definition:
        return None
    return fields[0], Sense(words[0], pos, definition, examples, tuple(words[1:]))


def load_senses(wordnet: Path, min_tagged: int) -> list[Sense]:
    """Most frequent sense of each common lemma, sorted for determinism."""
    root = wordnet / "usr/share/wordnet"
    senses: list[Sense] = []
    for short, pos in POS_FILES.items():
        synsets: dict[str, Sense] = {}
        for line in (root / f"data.{short}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue  # licence header
            parsed = parse_data_line(line, pos)
            if parsed:
                synsets[parsed[0]] = parsed[1]
        for line in (root / f"index.{short}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, n_ptr = fields[0], int(fields[3])
            tagged = int(fields[5 + n_ptr])
            offset = fields[6 + n_ptr]
            if tagged < min_tagged or not lemma.isalpha() or offset not in synsets:
                continue
            sense = synsets[offset]
            others = tuple(w for w in (sense.lemma, *sense.synonyms) if w.lower() != lemma)
            senses.append(Sense(lemma, pos, sense.definition, sense.examples, others))
    return sorted(senses, key=lambda s: (s.lemma, s.pos))


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _example_with(sense: Sense) -> str | None:
    for example in sense.examples:
        if re.search(rf"\b{re.escape(sense.lemma[:max(3, len(sense.lemma) - 2)])}", example, re.IGNORECASE):
            return example
    return None


def make_row(sense: Sense, rng: random.Random) -> dict[str, str]:
    """One alpaca row for `sense`, of a kind drawn among those the sense supports."""
    example = _example_with(sense)
    kinds = ["meaning", "meaning"]
    if example:
        kinds += ["usage", "context"]
    if sense.synonyms:
        kinds.append("synonym")
    kind = rng.choice(kinds)
    word, article = sense.lemma, "an" if sense.pos[0] in "aeiou" else "a"
    if kind == "usage":
        return {"instruction": f"Use the word \"{word}\" in a sentence.", "input": "", "output": _sentence(example)}
    if kind == "context":
        return {"instruction": f"What does the word \"{word}\" mean in the sentence below?", "input": _sentence(example),
                "output": f"Here \"{word}\" is {article} {sense.pos} meaning {sense.definition}."}
    if kind == "synonym":
        return {"instruction": f"Give a synonym of the {sense.pos} \"{word}\".", "input": "",
                "output": f"A synonym of \"{word}\" is \"{sense.synonyms[0]}\": both mean {sense.definition}."}
    return {"instruction": f"What does the word \"{word}\" mean?", "input": "",
            "output": f"As {article} {sense.pos}, \"{word}\" means {sense.definition}."}


def build_wordnet(wordnet: Path, out: Path, n_train: int, n_eval: int, seed: int, min_tagged: int) -> None:
    rng = random.Random(seed)
    senses = load_senses(wordnet, min_tagged)
    lemmas = sorted({s.lemma for s in senses})
    rng.shuffle(lemmas)
    eval_lemmas = set(lemmas[:n_eval])
    pools = {"train": [s for s in senses if s.lemma not in eval_lemmas], "eval": [s for s in senses if s.lemma in eval_lemmas]}
    out.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n_train), ("eval", n_eval)):
        pool = pools[split]
        if len(pool) < size:
            raise SystemExit(f"only {len(pool)} senses for {split}; lower --min-tagged")
        chosen = rng.sample(pool, size)
        rows = [make_row(s, rng) for s in chosen]
        _write_jsonl(out / f"{split}.jsonl", rows)
    copyright_text = (wordnet / "usr/share/doc/wordnet-base/copyright").read_text(encoding="utf-8")
    licence = copyright_text.split("License: WordNet3.0", 1)[1].split("\nFiles:", 1)[0]
    (out / "LICENSE").write_text(
        "The rows in train.jsonl and eval.jsonl are derived from WordNet 3.0 (definitions, examples,\n"
        "synonyms), as packaged by Debian (wordnet-base 1:3.0), under the WordNet 3.0 licence:\n\n"
        + "\n".join(line[1:] if line.startswith(" ") else line for line in licence.strip("\n").splitlines()).replace("\n.\n", "\n\n")
        + "\n",
        encoding="utf-8",
    )


def parse_tang300(path: Path) -> list[tuple[str, str, list[str]]]:
    """(title, author, lines) of each poem; entries are separated by '%', with ANSI colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(encoding="utf-8"))
    poems = []
    for entry in text.split("\n%\n"):
        lines = [line.strip() for line in entry.strip().splitlines() if line.strip()]
        if len(lines) < 3 or not lines[0].startswith("《") or not lines[1].startswith("作者："):
            continue
        poems.append((lines[0].strip("《》"), lines[1].removeprefix("作者："), lines[2:]))
    return poems


def build_tang(fortunes: Path, out: Path, n_train: int, n_eval: int, seed: int, max_chars: int = 100) -> None:
    rng = random.Random(seed)
    poems = [p for p in parse_tang300(fortunes / "usr/share/games/fortunes/tang300") if sum(map(len, p[2])) <= max_chars]
    rng.shuffle(poems)
    rows = []
    for title, author, lines in poems[: n_train + n_eval]:
        if len(lines) >= 2 and rng.random() < 0.5:
            rows.append({"instruction": f"请接着写出{author}《{title}》的下文。", "input": lines[0], "output": "\n".join(lines[1:])})
        else:
            rows.append({"instruction": f"请背诵{author}的《{title}》。", "input": "", "output": "\n".join(lines)})
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", rows[:n_train])
    _write_jsonl(out / "eval.jsonl", rows[n_train:])
    (out / "LICENSE").write_text(
        "The poems are Tang dynasty texts (618-907 AD), in the public domain. They were taken from the\n"
        "tang300 file of Debian's fortunes-zh package (2.98), whose packaging is\n"
        "Copyright 2001-2009 Yu Guanghui, 2015-2019 Mo Zhou, 2020-2021 xiao sheng wen,\n"
        "licensed GPL-3.0-or-later (https://www.gnu.org/licenses/gpl-3.0.html). The instruction rows\n"
        "(prompt wording, selection) were generated by slimtune's scripts/build_wordnet_dataset.py.\n",
        encoding="utf-8",
    )


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/tmp/wn"), help="folder where wordnet-base was extracted")
    parser.add_argument("--fortunes", type=Path, default=Path("/tmp/fz"), help="folder where fortunes-zh was extracted")
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write into")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--min-tagged", type=int, default=3, help="minimum WordNet tagged-sense count of a lemma")
    args = parser.parse_args()
    build_wordnet(args.wordnet, args.out / "wordnet_instruct", args.train, args.eval, args.seed, args.min_tagged)
    build_tang(args.fortunes, args.out / "tang300_zh", 120, 30, args.seed)


if __name__ == "__main__":
    main()
