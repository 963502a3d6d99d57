"""Child process of test_publish_faults.py: publish checkpoints in a loop until killed.

    python publish_child.py OUT START  # prints "published <g>" after each complete publish of generation g

Each generation g = START + 1, START + 2, ... publishes OUT/ckpt (replacing the previous one) and OUT/checkpoint-<g> (deleting all but
the two newest), three files each whose every byte encodes g, of a few hundred kB so that a kill lands in
every phase (writing, hashing, fsync, renames, deletion). After each publish the child checks that what now
stands at the target is complete (manifest sizes) and of generation g; a failed check ends it with an
AssertionError, which the parent sees as an exit that was not its SIGKILL. Loads elleci/checkpointing.py by path: it
imports nothing from elleci, so the child starts in milliseconds.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("checkpointing", ROOT / "elleci" / "checkpointing.py")
ck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ck)


def payload(g: int, i: int) -> bytes:
    return bytes([g % 251]) * (100_000 * (i + 1))


def main(out: Path, g: int) -> None:
    while True:
        g += 1
        for target in (out / "ckpt", out / f"checkpoint-{g}"):
            with ck.publish_dir(target) as tmp:
                for i in range(3):
                    (tmp / f"part{i}.bin").write_bytes(payload(g, i))
                (tmp / "gen.txt").write_text(str(g))
            ck.verify_dir(target, check_hashes=False)             # raises if the published copy is incomplete
            assert (target / "gen.txt").read_text() == str(g), f"{target} is not generation {g} after its publish"
        for old in sorted(ck.checkpoint_steps(out))[:-2]:
            ck.remove_dir(out / f"checkpoint-{old}")
        print(f"published {g}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
