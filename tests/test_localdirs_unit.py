"""LocalDirs alone: what a mount knows about directories it made, without Azure."""

from __future__ import annotations

from azregfs.localdirs import LocalDirs


def dirs(**kwargs) -> LocalDirs[str]:
    return LocalDirs(window=10.0, marker_delay=2.0, **kwargs)


def test_a_created_directory_lists_only_what_was_noted_until_its_window_ends() -> None:
    local = dirs()
    local.made("u", now=0)
    assert local.listing("u", now=1) == {}
    local.note("u/startedat", "file")
    local.note("u/data", "file")
    local.note("u/data", None)
    assert local.listing("u", now=9.9) == {"startedat": "file"}
    assert local.listing("u", now=10) is None  # from now on, Azure is asked
    assert local.listing("u", now=1) is None  # and it stays forgotten
    local.note("other/x", "file")  # not created here: nothing to keep


def test_created_directories_are_bounded_in_count_and_entries() -> None:
    local = dirs(max_created=2, max_entries=3)
    for name in ("a", "b", "c"):
        local.made(name, now=0)
    assert local.listing("a", now=0) is None and local.listing("c", now=0) == {}
    for index in range(4):
        local.note(f"c/{index}", "file")
    assert local.listing("c", now=0) is None  # too big to keep: Azure is asked


def test_mkdir_p_then_a_file_needs_no_marker() -> None:
    local = dirs()
    for path in ("a", "a/b", "a/b/c"):
        local.made(path, now=0)
        assert local.exists(path)
    local.child_landed("a/b/c/f")
    assert not any(local.exists(p) for p in ("a", "a/b", "a/b/c"))
    assert local.due(now=100) == []


def test_an_empty_tree_gets_one_marker_for_its_leaf_when_due() -> None:
    local = dirs()
    for path in ("a", "a/b", "a/b/c"):
        local.made(path, now=0)
    local.made("a/x", now=1)
    assert local.next_due() == 2
    assert local.due(now=1.9) == []
    assert local.due(now=2) == ["a/b/c"]  # a and a/b are parents of another unmarked dir
    assert local.exists("a/x") and not local.exists("a/b")
    assert local.due(now=3) == ["a/x"]
    assert local.unmarked_count == 0


def test_fsyncdir_and_unmount_make_markers_due_at_once() -> None:
    local = dirs()
    local.made("a", now=0)
    local.made("a/b", now=0)
    local.made("z", now=0)
    assert local.due(now=0, under="a") == ["a/b"]
    assert local.due(now=0, under="") == ["z"]


def test_rmdir_forgets_a_directory_and_what_is_under_it() -> None:
    local = dirs()
    local.made("u", now=0)
    local.made("u/h", now=0)
    local.made("u/h/s", now=0)
    local.removed("u/h")
    assert local.exists("u") and not local.exists("u/h/s")
    assert local.listing("u/h", now=0) is None
    assert local.due(now=5) == ["u"]


def test_emptied_directories_are_due_after_the_delay_unless_refilled() -> None:
    local = dirs()
    local.emptied("d", now=0)
    local.emptied("e", now=0)
    local.emptied("", now=0)  # the root needs no marker
    local.child_landed("d/new")
    assert local.due(now=2) == ["e"]


def test_too_many_unmarked_directories_are_due_early() -> None:
    local = dirs(max_unmarked=2)
    for index in range(4):
        local.emptied(f"d{index}", now=index)
    assert local.due(now=0) == ["d0", "d1"]  # the oldest, so that two are left
    assert local.unmarked_count == 2


def test_a_renamed_directory_takes_its_unmarked_directories_along() -> None:
    local = dirs()
    local.made("a", now=0)
    local.made("a/b", now=0)
    local.moved("a", "z", now=5)
    assert not local.exists("a") and not local.exists("a/b")
    assert local.exists("z") and local.exists("z/b")
    assert local.unmarked_children("") == ["z"] and local.unmarked_children("z") == ["b"]
    assert local.listing("a", now=5) is None
    assert local.due(now=6) == []
    assert local.due(now=7) == ["z/b"]
