"""Discovery of two-time result files: both layouts, skipped files with their reason."""

from __future__ import annotations

import pytest
from batch_helpers import apsu_file, corrupt_apsu, hdf5_without_maps, legacy_file, not_hdf5

from xpcsfit.batch.discover import INVALID, NOT_A_RESULT, discover
from xpcsfit.errors import InputError


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    apsu_file(root / "a" / "one.hdf")
    apsu_file(root / "a" / "b" / "two.h5", q=(0.004, 0.006))
    legacy_file(root / "c" / "old.hdf")
    not_hdf5(root / "c" / "notes.hdf")
    hdf5_without_maps(root / "c" / "other.h5")
    corrupt_apsu(root / "d" / "broken.hdf")
    not_hdf5(root / "a" / "readme.txt")  # no pattern matches: not a candidate
    apsu_file(root / ".hidden" / "x.hdf")  # hidden directory: passed over
    return root


def test_found_and_skipped_with_reasons(tree):
    d = discover(tree)
    assert [f.path.relative_to(tree).as_posix() for f in d.found] == ["a/b/two.h5", "a/one.hdf", "c/old.hdf"]
    assert [f.info.layout for f in d.found] == ["aps-u", "aps-u", "legacy"]
    assert d.found[0].info.q_grid.size == 2 and d.found[0].dt == pytest.approx(0.1)
    assert all(f.root == tree.resolve() for f in d.found)
    skipped = {s.path.relative_to(tree).as_posix(): s for s in d.skipped}
    assert set(skipped) == {"c/notes.hdf", "c/other.h5", "d/broken.hdf"}
    assert skipped["c/notes.hdf"].kind == NOT_A_RESULT
    assert skipped["c/notes.hdf"].reason == "not an HDF5 file"
    assert skipped["c/other.h5"].kind == NOT_A_RESULT and "missing key" in skipped["c/other.h5"].reason
    assert skipped["d/broken.hdf"].kind == INVALID and "processed_bins" in skipped["d/broken.hdf"].reason
    for s in d.skipped:
        assert "\n" not in s.reason and str(s.path) not in s.reason


def test_pattern_on_name_and_on_relative_path(tree):
    assert [f.path.name for f in discover(tree, "*.h5").found] == ["two.h5"]
    assert [f.path.name for f in discover(tree, "a/*").found] == ["one.hdf"]
    assert [s.path.name for s in discover(tree, "a/*").skipped] == ["one.truth.json", "readme.txt"]


def test_roots_file_and_overlap(tree):
    d = discover([tree / "a", tree, tree / "c" / "old.hdf"])
    assert len(d.found) == 3  # each file once
    assert d.found[0].root == (tree / "a").resolve()
    single = discover(str(tree / "c" / "old.hdf"))
    assert single.found[0].root == (tree / "c").resolve()


def test_linked_file_keeps_its_place_in_the_tree(tree, tmp_path):
    root = tmp_path / "linked"
    (root / "s").mkdir(parents=True)
    (root / "s" / "one.hdf").symlink_to(tree / "a" / "one.hdf")
    (root / "s" / "again.hdf").symlink_to(tree / "a" / "one.hdf")
    d = discover(root)
    assert [f.path for f in d.found] == [root / "s" / "again.hdf"]  # the same file once
    assert d.found[0].root == root


def test_missing_root_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such file or directory$"):
        discover(tmp_path / "nowhere")
