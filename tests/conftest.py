"""
pytest set-up shared by every test module.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _runInTemporaryDirectory(tmp_path_factory):
    """
    Run the tests in a fresh temporary directory, as trial does in
    C{_trial_temp}, so that C{TestCase.mktemp} never writes into the
    working tree.
    """
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(previous)
