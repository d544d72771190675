"""Copy drtune.py's scaffold into the other algorithm scripts (the fixing half of tests/test_scaffold.py, as
diffusers' `utils/check_copies.py --fix_and_overwrite` is for its "Copied from" blocks).

Edit the scaffold in drtune.py only, then run

    python tools/sync_scaffold.py            # rewrite the other scripts
    python tools/sync_scaffold.py --check    # exit 1 and name the pieces that differ

Scripts whose scaffold region is drtune.py's text (test_scaffold.FULL_SCAFFOLD) get the whole region and the
__main__ block; the others (their own main) get every top-level function, class and constant they share with
drtune.py's scaffold, in place. `--add NAME[,NAME]` also inserts scaffold pieces a script does not have yet, at the
end of its scaffold region.
"""
import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from test_scaffold import BEGIN, END, FULL_SCAFFOLD, SCRIPTS, scaffold_region  # noqa: E402


def pieces(text):
    """name -> (start, end) character offsets of each top-level def, class and assignment, and the __main__ block."""
    tree, lines = ast.parse(text), text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    out = {}
    for node in tree.body:
        name = None
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            name = "__main__"
        if name is not None:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out[name] = (starts[first - 1], starts[node.end_lineno])
    return out


def sync(name, reference, add=()):
    path = os.path.join(ROOT, name)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = text
    if name in FULL_SCAFFOLD:
        new = new.replace(scaffold_region(new), scaffold_region(reference))
        ref_main, main = pieces(reference)["__main__"], pieces(new)["__main__"]
        new = new[:main[0]] + reference[ref_main[0]:ref_main[1]] + new[main[1]:]
    else:
        region = scaffold_region(reference)
        shared = pieces(region)
        for key, (a, b) in sorted(shared.items(), key=lambda kv: -pieces(new).get(kv[0], (-1, -1))[0]):
            theirs = pieces(new)
            if key in ("main", "__main__") or key not in theirs:
                continue
            start, end = theirs[key]
            new = new[:start] + region[a:b] + new[end:]
        for key in add:
            if key not in shared or key in pieces(new):
                continue
            a, b = shared[key]
            end = new.index(END, new.index(BEGIN))
            end = new.rfind("\n# ----", 0, end) + 1  # before the "# ---" rule that opens the Algorithm region
            new = new[:end] + region[a:b] + "\n\n" + new[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--add", default="", help="scaffold pieces to insert where missing (comma separated)")
    args = parser.parse_args()
    with open(os.path.join(ROOT, "drtune.py"), encoding="utf-8") as f:
        reference = f.read()
    changed = []
    for name in SCRIPTS:
        if name == "drtune.py" or not os.path.exists(os.path.join(ROOT, name)):
            continue
        if args.check:
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                before = f.read()
            if sync(name, reference, [a for a in args.add.split(",") if a]):
                changed.append(name)
                with open(os.path.join(ROOT, name), "w", encoding="utf-8") as f:
                    f.write(before)
        elif sync(name, reference, [a for a in args.add.split(",") if a]):
            changed.append(name)
    print(("differ: " if args.check else "rewritten: ") + (", ".join(changed) or "none"))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
