"""A secured coordinator commits a step once most of its senders said so (`StepVotes`)."""

from __future__ import annotations

from edgeddl.runtime.fleet.votes import StepVotes

SENDERS = {0, 1, 2}
ALL = (0, 1, 2)


def test_a_step_is_committed_once_most_of_its_senders_named_the_same_table() -> None:
    votes = StepVotes()
    assert votes.add(4, ALL, 0, SENDERS) == []
    assert votes.add(4, ALL, 0, SENDERS) == []  # the same voter twice is one voice
    assert votes.add(4, ALL, 1, SENDERS) == [(4, ALL)]
    two = StepVotes()
    assert two.add(4, (0, 1), 0, {0, 1}) == []  # one of two is not most
    assert two.add(4, (0, 1), 1, {0, 1}) == [(4, (0, 1))]


def test_a_table_one_voter_chose_does_not_commit_and_the_others_outvote_it() -> None:
    votes = StepVotes()
    assert votes.add(4, (0,), 0, SENDERS) == []  # a stolen key names itself alone
    assert votes.add(4, (0,), 7, SENDERS) == []  # and a device that sent nothing is no voter
    assert votes.add(4, ALL, 1, SENDERS) == []
    assert votes.add(4, ALL, 2, SENDERS) == [(4, ALL)]
    alone = StepVotes()  # counted against the step's senders, not against the table
    assert alone.add(4, (0,), 0, SENDERS) == []


def test_a_step_committed_commits_the_earlier_ones_first_with_their_most_named_table() -> None:
    votes = StepVotes()
    senders = {0, 1, 2, 3, 4}
    assert votes.add(3, (0, 1), 0, senders) == []  # two tables, then a tie: the first named
    assert votes.add(3, (0, 1, 2), 2, senders) == []
    assert votes.add(3, (0, 1, 2), 1, senders) == []
    assert votes.add(2, (0, 1), 0, senders) == []
    assert votes.add(2, (0, 1, 4), 4, senders) == []
    assert votes.add(5, (0, 1), 0, {0, 1}) == []
    assert votes.add(5, (0, 1), 1, {0, 1}) == [(2, (0, 1)), (3, (0, 1, 2)), (5, (0, 1))]
    votes.forget(5)  # decided: nothing older is left to commit
    assert votes.add(6, (0,), 0, {0}) == [(6, (0,))]
    assert votes.add(3, (0, 1, 2), 0, senders) == []  # voted on again from nothing
