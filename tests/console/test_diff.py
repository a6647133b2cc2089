"""How the console reads a diff: files with their added and removed lines."""

from __future__ import annotations

from api.console.diff import MAX_SHOWN_LINES, parse_diff

DIFF = """diff --git a/hello.txt b/hello.txt
new file mode 100644
index 0000000..13ce5e4
--- /dev/null
+++ b/hello.txt
@@ -0,0 +1,2 @@
+hello
+--- not a header
diff --git a/notes/old.md b/notes/old.md
index 1111111..2222222 100644
--- a/notes/old.md
+++ b/notes/old.md
@@ -1,3 +1,2 @@
 keep
-gone
--- a removed line that looks like a header
"""


def test_each_file_shows_its_added_and_removed_lines() -> None:
    files, cut = parse_diff(DIFF)
    assert [(f.path, f.added, f.removed) for f in files] == [
        ("hello.txt", 2, 0),
        ("notes/old.md", 0, 2),
    ]
    assert not cut
    kinds = [line.kind for line in files[1].lines]
    assert kinds == ["meta", "meta", "meta", "hunk", "ctx", "del", "del"]


def test_a_long_diff_is_cut_on_the_page_but_still_counted() -> None:
    body = "".join(f"+line {i}\n" for i in range(MAX_SHOWN_LINES + 10))
    files, cut = parse_diff("diff --git a/big b/big\n@@ -0,0 +1 @@\n" + body)
    assert cut
    assert files[0].added == MAX_SHOWN_LINES + 10
    assert len(files[0].lines) == MAX_SHOWN_LINES


def test_no_diff_means_no_files() -> None:
    assert parse_diff("") == ([], False)
