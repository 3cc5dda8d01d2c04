"""Step plans: the leader sends whole sequences once, then only what changed (pure Python)."""
from seesaw_mc.sampling_params import SamplingParams
from seesaw_mc.core.sequence import Sequence
from seesaw_mc.core.step_plan import PlanBuilder, SequenceMirror


def test_plans_carry_diffs_and_mirror_tracks_leader():
    p = SamplingParams(temperature=0)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], p, seed=1)
    b = Sequence("b", 0, [7, 8], p, seed=2)
    a.block_table, b.block_table = [0, 1], [2]
    builder, mirror = PlanBuilder(), SequenceMirror()

    plan = builder.build("prefill", [a, b])
    assert [n.token_ids for n in plan.new] == [[1, 2, 3, 4, 5], [7, 8]] and not plan.appended
    got = mirror.apply(plan)
    a.token_ids.append(9)  # sampled by the prefill step
    b.token_ids.append(10)

    plan = builder.build("decode", [a, b])
    assert not plan.new
    assert plan.appended == [(a.seq_id, [9], []), (b.seq_id, [10], [])]  # one token each, no new block
    got = mirror.apply(plan)
    assert [s.token_ids for s in got] == [a.token_ids, b.token_ids]

    a.token_ids.append(11)
    b.token_ids.append(12)
    b.block_table.append(3)
    builder.forget(a)  # finished
    plan = builder.build("decode", [b])
    assert plan.freed == [a.seq_id] and plan.appended == [(b.seq_id, [12], [3])]
    got = mirror.apply(plan)
    assert a.seq_id not in mirror.seqs
    assert got[0].token_ids == b.token_ids and got[0].block_table == [2, 3]
    assert got[0].num_output_tokens == b.num_output_tokens and got[0].seed == 2


def test_preempted_sequence_is_resent_whole():
    p = SamplingParams(temperature=0)
    s = Sequence("s", 0, [1, 2], p, seed=0)
    s.block_table = [0]
    builder, mirror = PlanBuilder(), SequenceMirror()
    mirror.apply(builder.build("prefill", [s]))
    s.token_ids.append(3)
    builder.forget(s)  # preempted: blocks freed
    s.block_table = [5]
    plan = builder.build("prefill", [s])
    assert plan.freed == [s.seq_id] and plan.new[0].token_ids == [1, 2, 3]
    got = mirror.apply(plan)
    assert got[0].token_ids == [1, 2, 3] and got[0].num_prompt_tokens == 2 and got[0].block_table == [5]


def test_freed_survive_a_step_with_nothing_to_run():
    """Issue 15 item 8: a scheduled step with nothing to compute or copy (plan_step -> None)
    must not drop what the leader forgot that step; the next plan carries it, so the
    followers' mirrors do not keep (leak) sequences the leader has let go."""
    from seesaw_mc.core.scheduler import Phase, SchedulerOutput

    p = SamplingParams(temperature=0)
    a, b = Sequence("a", 0, [1, 2, 3], p, seed=0), Sequence("b", 0, [4, 5], p, seed=0)
    a.block_table, b.block_table = [0], [1]
    builder, mirror = PlanBuilder(), SequenceMirror()
    mirror.apply(builder.plan_step(SchedulerOutput(Phase.PREFILL, [a, b])))
    b.token_ids.append(6)
    builder.after_step(SchedulerOutput(Phase.PREFILL, [a, b]), [a])  # a finished in that step
    # Nothing runs next step (e.g. b was preempted and waits): no plan goes out.
    assert builder.plan_step(SchedulerOutput(Phase.DECODE, [], preempted=[b])) is None
    c = Sequence("c", 0, [7], p, seed=0)
    c.block_table = [2]
    plan = builder.plan_step(SchedulerOutput(Phase.PREFILL, [c]))
    assert sorted(plan.freed) == sorted([a.seq_id, b.seq_id])
    mirror.apply(plan)
    assert set(mirror.seqs) == {c.seq_id}


def test_pending_sends_are_released_oldest_first():
    """gloo's Work.is_completed() stays False until wait(), so a sender keeps at most
    MAX_PENDING_SENDS unwaited and waits on the oldest beyond that (their tensors are freed)."""
    from seesaw_mc.parallel.megatron_adapter import MAX_PENDING_SENDS, release_sends

    class Work:
        def __init__(self, i):
            self.i, self.waited = i, False

        def wait(self):
            self.waited = True

    works = [Work(i) for i in range(MAX_PENDING_SENDS + 3)]
    sends = [(w, None) for w in works]
    release_sends(sends)
    assert [w.i for w, _ in sends] == list(range(3, MAX_PENDING_SENDS + 3))
    assert [w.waited for w in works] == [True] * 3 + [False] * MAX_PENDING_SENDS
    release_sends(sends)  # within the bound: nothing more is waited on
    assert len(sends) == MAX_PENDING_SENDS and not any(w.waited for w, _ in sends)
