"""Hub names: a repository id is ``owner/name`` (huggingface_hub's own validator agrees); paths are not ids."""
from __future__ import annotations

import pytest
from huggingface_hub.utils import validate_repo_id

from engine.hub import HUB_REPO, looks_like_repo_id


@pytest.mark.parametrize("spec", [HUB_REPO, "Ruicheng/moge-2-vitl-normal", "a/b"])
def test_repo_ids(spec):
    validate_repo_id(spec)  # the hub's validator accepts it, and so do we
    assert looks_like_repo_id(spec)


@pytest.mark.parametrize("spec", ["weights", "./a/b", "../a", "~/a", "/abs/path", "a/b/c", "a\\b", "a/", "/a"])
def test_paths_are_not_repo_ids(spec):
    assert not looks_like_repo_id(spec)

