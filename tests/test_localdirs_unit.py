"""LocalDirs alone: what a mount knows about directories it made, without Azure."""

from __future__ import annotations

from azregfs.fs.localdirs import LocalDirs


def dirs(**kwargs) -> LocalDirs[str]:
    return LocalDirs(window=1.0, marker_delay=2.0, **kwargs)


def test_a_created_directory_lists_only_what_was_noted_until_its_window_ends() -> None:
    local = dirs()
    local.made("u", proven_at=0, now=0.2)
    assert local.listing("u", now=0.5) == {}
    local.note("u/startedat", "file")
    local.note("u/data", "file")
    local.note("u/data", None)
    assert local.listing("u", now=0.99) == {"startedat": "file"}
    # dir_timeout after Azure proved the name absent (not after the mkdir): from now on
    # Azure is asked, so another host's file there shows within dir_timeout of its close.
    assert local.listing("u", now=1.0) is None
    assert local.listing("u", now=0.5) is None  # and it stays forgotten
    local.note("other/x", "file")  # not created here: nothing to keep


def test_a_directory_proven_absent_too_long_ago_or_never_has_no_own_listing() -> None:
    local = dirs()
    local.made("late", proven_at=0, now=1.5)
    local.made("unproven", proven_at=None, now=0)
    assert local.listing("late", now=1.5) is None and local.listing("unproven", now=0) is None
    assert local.exists("late") and local.exists("unproven")  # unmarked all the same


def test_a_child_made_in_a_created_directory_inherits_its_proof() -> None:
    local = dirs()
    local.made("a", proven_at=3, now=3.1)
    assert local.proven_at("a") == 3
    local.made("a/b", proven_at=local.proven_at("a"), now=3.8)
    assert local.listing("a/b", now=3.9) == {}
    assert local.listing("a/b", now=4.0) is None


def test_created_directories_are_bounded_in_count_and_entries() -> None:
    local = dirs(max_created=2, max_entries=3)
    for name in ("a", "b", "c"):
        local.made(name, proven_at=0, now=0)
    assert local.listing("a", now=0) is None and local.listing("c", now=0) == {}
    for index in range(4):
        local.note(f"c/{index}", "file")
    assert local.listing("c", now=0) is None  # too big to keep: Azure is asked


def test_mkdir_p_then_a_file_needs_no_marker() -> None:
    local = dirs()
    for path in ("a", "a/b", "a/b/c"):
        local.made(path, proven_at=0, now=0)
        assert local.exists(path)
    local.child_landed("a/b/c/f")
    assert not any(local.exists(p) for p in ("a", "a/b", "a/b/c"))
    assert local.due(now=100) == []


def test_an_empty_tree_gets_one_marker_for_its_leaf_when_due() -> None:
    local = dirs()
    for path in ("a", "a/b", "a/b/c"):
        local.made(path, proven_at=0, now=0)
    local.made("a/x", proven_at=1, now=1)
    assert local.next_due() == 2
    assert local.due(now=1.9) == []
    assert local.due(now=2) == ["a/b/c"]  # a and a/b are parents of another unmarked dir
    assert local.exists("a/b/c")  # until its marker lands
    assert local.due(now=2.5) == []  # handed out once
    local.visible("a/b/c")
    assert local.exists("a/x") and not local.exists("a/b")
    assert local.due(now=3) == ["a/x"]
    local.visible("a/x")
    assert local.unmarked_count == 0


def test_a_directory_removed_or_moved_after_it_was_handed_out_is_no_longer_due() -> None:
    """The markers handed out together are put one after another: one removed or moved
    meanwhile must not be put when its turn comes (markers.write_due asks)."""
    local = dirs()
    for path in ("a", "b", "c", "d"):
        local.made(path, proven_at=0, now=0)
    assert local.due(now=2) == ["a", "b", "c", "d"]
    assert all(local.handed_out(path) for path in "abcd")
    local.removed("b")
    local.moved("c", "e", now=2.1)
    local.postpone("d", now=2.1)
    assert local.handed_out("a")
    assert not local.handed_out("b") and not local.handed_out("c")
    assert not local.handed_out("d") and not local.handed_out("e")
    assert sorted(local.due(now=4.1)) == ["d", "e"]  # each due again after the delay


def test_fsyncdir_and_unmount_make_markers_due_at_once() -> None:
    local = dirs()
    local.made("a", proven_at=0, now=0)
    local.made("a/b", proven_at=0, now=0)
    local.made("z", proven_at=0, now=0)
    assert local.due(now=0, under="a") == ["a/b"]
    assert local.due(now=0, under="") == ["z"]


def test_rmdir_forgets_a_directory_and_what_is_under_it() -> None:
    local = dirs()
    local.made("u", proven_at=0, now=0)
    local.made("u/h", proven_at=0, now=0)
    local.made("u/h/s", proven_at=0, now=0)
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
    local.visible("d0")
    local.visible("d1")
    assert local.unmarked_count == 2


def test_a_renamed_directory_takes_its_unmarked_directories_along() -> None:
    local = dirs()
    local.made("a", proven_at=0, now=0)
    local.made("a/b", proven_at=0, now=0)
    local.moved("a", "z", now=5)
    assert not local.exists("a") and not local.exists("a/b")
    assert local.exists("z") and local.exists("z/b")
    assert local.unmarked_children("") == ["z"] and local.unmarked_children("z") == ["b"]
    assert local.listing("a", now=5) is None
    assert local.due(now=6) == []
    assert local.due(now=7) == ["z/b"]


def test_ancestors_of_an_unmarked_directory_exist_and_list_the_way_down() -> None:
    """a/b/c/f committed (a, a/b, a/b/c show in Azure by prefix), then f renamed away:
    a/b/c is unmarked, and Azure has nothing under a. rmdir a must see a child."""
    local = dirs()
    local.made("a", proven_at=0, now=0)
    local.made("a/b", proven_at=0, now=0)
    local.made("a/b/c", proven_at=0, now=0)
    local.child_landed("a/b/c/f")
    assert not local.exists("a")
    local.emptied("a/b/c", now=1)
    assert local.exists("a") and local.exists("a/b") and local.exists("a/b/c")
    assert not local.exists("a/b/c/f") and not local.exists("ab")
    assert local.unmarked_children("") == ["a"]
    assert local.unmarked_children("a") == ["b"] and local.unmarked_children("a/b") == ["c"]
    assert local.unmarked_children("a/b/c") == [] and local.unmarked_children("z") == []
    local.removed("a/b/c")
    assert not local.exists("a") and local.unmarked_children("") == []


def test_a_marker_written_for_a_leaf_ends_what_its_ancestors_held() -> None:
    local = dirs()
    local.emptied("a/b/c", now=0)
    assert local.exists("a")
    assert local.due(now=5) == ["a/b/c"]
    local.visible("a/b/c")
    assert not local.exists("a") and not local.exists("a/b/c")


def test_a_directory_stays_listed_while_its_marker_is_put() -> None:
    """x/y's last file renamed away: x/y's marker falls due. Until the put lands, Azure
    shows neither x nor x/y, so this table must: a root listing made meanwhile showed no
    x (seen in CI under load)."""
    local = dirs()
    local.emptied("x/y", now=0)
    assert local.due(now=5) == ["x/y"]
    assert local.exists("x") and local.exists("x/y")
    assert local.unmarked_children("") == ["x"] and local.unmarked_children("x") == ["y"]
    assert local.next_due() is None  # not handed out twice
    local.postpone("x/y", now=5)  # the put failed: due again after the delay
    assert local.next_due() == 7 and local.exists("x")
    assert local.due(now=7) == ["x/y"]
    local.visible("x/y")
    assert not local.exists("x") and local.unmarked_children("") == []
