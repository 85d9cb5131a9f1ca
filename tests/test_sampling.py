import h5py
import numpy as np
import pytest
import torch

from pipeline import sampling, storage
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec
from pipeline.sampling import (
    MIN_REDRAW,
    REGION_FIRST_DRAWS,
    SamplingError,
    _fill,
    _redraw_count,
    read_observations,
    sample_posterior,
)
from tests.conftest import record_draws


def _posterior(members: int = 1, theta_std: float = 1.0, seed: int = 0) -> NeuralPosterior:
    torch.manual_seed(seed)
    spec = PosteriorSpec(
        parameter_names=("a", "b"),
        x_shape=(3,),
        flow="maf",
        transforms=1,
        flow_hidden=(8,),
        embedding="identity",
        ensemble=members,
    )
    return NeuralPosterior(spec, theta_std=torch.full((2,), theta_std)).eval()


@pytest.fixture
def posterior():
    # theta_std of 2 puts much of the untrained flow's mass outside [-1, 1]^2.
    return _posterior(theta_std=2.0)


def test_fill_appends_accepted_draws_in_order():
    samples, log_prob = np.zeros((2, 3, 1)), np.zeros((2, 3))
    filled = np.array([0, 2])
    theta = np.arange(8, dtype=float).reshape(2, 4, 1)
    lp = -theta[..., 0]
    inside = np.array([[False, True, True, False], [True, True, True, True]])
    _fill(samples, log_prob, filled, theta, lp, inside)
    np.testing.assert_array_equal(samples[0, :2, 0], [1, 2])
    np.testing.assert_array_equal(samples[1, 2:, 0], [4])  # only one slot was left
    np.testing.assert_array_equal(log_prob[0, :2], [-1, -2])
    np.testing.assert_array_equal(filled, [2, 3])


def test_samples_respect_the_prior_box_and_shapes(posterior):
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    result = sample_posterior(posterior, x, 50, low=low, high=high)
    assert result.samples.shape == (7, 50, 2) and result.log_prob.shape == (7, 50)
    assert (result.samples >= -1).all() and (result.samples <= 1).all()
    # The stored log-densities are the model's, untouched by the rejection.
    recomputed = (
        posterior.log_prob(
            torch.as_tensor(result.samples[:, :, None, :][:, :, 0]).transpose(0, 1),
            torch.as_tensor(x),
        )
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(recomputed.T, result.log_prob, rtol=1e-4, atol=1e-4)


def test_one_observations_many_draws_are_kept_call_by_call(posterior, monkeypatch):
    """A pass of many draws at one observation was concatenated whole before its accepted draws
    were kept, with int64 temporaries per draw: 6 * 10^6 samples took 12 times the memory the
    size check budgets. Each call's draws are kept as they come."""
    import pipeline.sampling as sampling

    monkeypatch.setattr(sampling, "_samples_per_call", lambda posterior: 100)
    sizes = []
    real = sampling._fill

    def recorded(samples, log_prob, filled, theta, lp, inside, which=None):
        sizes.append(theta.shape[1])
        real(samples, log_prob, filled, theta, lp, inside, which)

    monkeypatch.setattr(sampling, "_fill", recorded)
    x = np.random.default_rng(0).normal(size=(1, 3)).astype(np.float32)
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    result = sample_posterior(posterior, x, 2000, low=low, high=high)
    assert max(sizes) == 100 and sum(sizes) >= 2000
    assert np.isfinite(result.samples).all() and (np.abs(result.samples) <= 1).all()


def test_a_prior_box_holding_a_few_percent_is_judged_on_enough_draws(posterior):
    """With 20 samples asked per observation, an observation with none of its first 20 draws
    inside a box holding a few percent of them failed the stage as "fewer than 1e-3 inside":
    acceptance is judged once 1 / 1e-3 draws are in, and a box the posterior misses is named."""
    # Above 2 the fixture's untrained flow puts 13-18 % of its draws at these observations
    # (4000 each): 0 of 20 happens at some of 30 (0.87^20 = 0.06 each), 0 of 1000 at none.
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    low, high = np.array([2.0, -10.0]), np.array([10.0, 10.0])
    result = sample_posterior(posterior, x, 20, low=low, high=high)
    assert (result.samples[..., 0] >= 2.0).all()
    far, farther = np.array([50.0, -10.0]), np.array([60.0, 10.0])
    with pytest.raises(
        SamplingError, match=r"samples of observation\(s\) 0, 1, 2 fall inside the prior"
    ):
        sample_posterior(posterior, x[:3], 20, low=far, high=farther)
    # Named by their rows in the file (the stage samples only the finite ones).
    with pytest.raises(SamplingError, match=r"samples of observation\(s\) 4, 7, 9 fall"):
        sample_posterior(posterior, x[:3], 20, low=far, high=farther, rows=np.array([4, 7, 9]))


def test_draws_rejected_by_the_box_are_replaced_by_a_pass_of_their_own_size(monkeypatch):
    # An untrained flow of theta_std 0.5 puts a few tens of percent of its draws outside
    # [-1, 1]^2.
    posterior = _posterior(theta_std=0.5)
    passes = []
    draw = posterior.sample_and_log_prob

    def recorded(x, num_samples):
        theta, log_prob = draw(x, num_samples)
        passes.append(theta)
        return theta, log_prob

    monkeypatch.setattr(posterior, "sample_and_log_prob", recorded)
    x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    result = sample_posterior(posterior, x, 2000, low=np.full(2, -1.0), high=np.full(2, 1.0))
    assert np.isfinite(result.samples).all() and (np.abs(result.samples) <= 1).all()
    # The second pass draws what the first pass's acceptance needs to fill the largest
    # shortfall, a fifth to spare, not another 2000.
    accepted = (passes[0].abs() <= 1).all(dim=-1).sum(dim=0).numpy()  # (3,)
    assert 0 < (2000 - accepted).max() < 1000
    needed = np.ceil(1.2 * ((2000 - accepted) / (accepted / 2000)).max())
    assert len(passes[1]) == max(MIN_REDRAW, needed) < 2000


class HalfPlane:
    """A region of the first parameter above zero (a stand-in for a round's region)."""

    def accepts(self, theta: np.ndarray) -> np.ndarray:
        return theta[:, 0] > 0


def test_a_call_restricted_to_a_region_draws_no_more_than_a_call_may(posterior, monkeypatch):
    # A region's first pass draws REGION_FIRST_DRAWS per observation however few samples are
    # asked: the observations per call must count those draws, or a call holds
    # REGION_FIRST_DRAWS / num_samples times the draws that bound its memory.
    monkeypatch.setattr(sampling, "CPU_SAMPLES_PER_CALL", 3 * REGION_FIRST_DRAWS)
    calls = record_draws(posterior, monkeypatch)
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    result = sample_posterior(posterior, x, 50, region=HalfPlane())
    assert (result.samples[..., 0] > 0).all() and result.sampled.all()
    assert calls[0] == 3 * REGION_FIRST_DRAWS  # three observations of the first call
    assert max(calls) <= sampling.CPU_SAMPLES_PER_CALL


class FarTail:
    """A region the posterior reaches rarely: its first parameter above 3 (standardised 1.5)."""

    def accepts(self, theta: np.ndarray) -> np.ndarray:
        return theta[:, 0] > 3


def test_a_rejection_from_a_region_that_goes_on_logs_its_progress(posterior, monkeypatch, caplog):
    # Passes of at most REGION_FIRST_DRAWS draws: a rare acceptance takes many, for minutes on
    # a real posterior; every PROGRESS_SECONDS (here each pass) a line says how it stands.
    monkeypatch.setattr(sampling, "PROGRESS_SECONDS", 0.0)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    with caplog.at_level("INFO", logger="pipeline.sampling"):
        sample_posterior(posterior, x, 500, region=FarTail())
    lines = [r.message for r in caplog.records if "still short of samples" in r.message]
    assert lines and "the slowest accepts" in lines[0] and "ETA" in lines[0]


def test_one_observation_asked_for_more_draws_than_a_call_holds_is_drawn_in_several(
    posterior, monkeypatch
):
    # truncate asks 10^5 draws of one observation: the observations per call cannot bound
    # that call, so its draws are split into calls of at most CPU_SAMPLES_PER_CALL.
    monkeypatch.setattr(sampling, "CPU_SAMPLES_PER_CALL", 1000)
    calls = record_draws(posterior, monkeypatch)
    x = np.random.default_rng(0).normal(size=(1, 3)).astype(np.float32)
    result = sample_posterior(posterior, x, 2500)
    assert calls[:3] == [1000, 1000, 500] and max(calls) <= 1000
    assert result.sampled.all() and np.isfinite(result.samples).all()
    assert np.isfinite(result.log_prob).all()
    # The parts are distinct draws, not one call's repeated.
    assert len(np.unique(result.samples[0, :, 0])) == 2500


def test_a_pass_after_the_first_draws_what_the_acceptance_needs():
    # 10 missing at acceptance 0.5: 1.2 x 20 = 24, raised to MIN_REDRAW.
    assert _redraw_count(np.array([10]), np.array([90]), np.array([180]), 1000) == MIN_REDRAW
    # The largest need of the observations short sets the pass: 1.2 x 500 / 0.5 = 1200.
    assert (
        _redraw_count(np.array([10, 500]), np.array([990, 500]), np.array([1000, 1000]), 5000)
        == 1200
    )
    # Nothing accepted yet: as if one were, and never more than the first pass.
    assert _redraw_count(np.array([1000]), np.array([0]), np.array([1000]), 1000) == 1000


def test_observations_from_npy_and_shape_errors(tmp_path):
    np.save(tmp_path / "obs.npy", np.zeros((4, 3)))
    x, theta = read_observations(tmp_path / "obs.npy", (3,))
    assert x.shape == (4, 3) and theta is None
    np.save(tmp_path / "one.npy", np.zeros(3))
    assert read_observations(tmp_path / "one.npy", (3,))[0].shape == (1, 3)
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"shape \(4, 5\), expected \(n_obs, 3\)"):
        read_observations(tmp_path / "bad.npy", (3,))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        read_observations(tmp_path / "missing.npy", (3,))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"empty.npy holds no observations \(x has 0 rows\)"):
        read_observations(tmp_path / "empty.npy", (3,))
    # A true theta of another width would be broadcast into log q(theta_true | x).
    with h5py.File(tmp_path / "narrow.h5", "w") as f:
        f["x"], f["theta"] = np.zeros((4, 3)), np.zeros((4, 1))
    assert read_observations(tmp_path / "narrow.h5", (3,))[1].shape == (4, 1)
    with pytest.raises(ValueError, match=r"theta has shape \(4, 1\), expected \(4, 2\)"):
        read_observations(tmp_path / "narrow.h5", (3,), 2)


def test_ensemble_density_is_the_mixture_of_its_members():
    posterior = _posterior(members=3, seed=1)
    theta, x = torch.randn(6, 2), torch.randn(6, 3)
    with torch.no_grad():
        members = torch.stack([m(x).log_prob(theta) for m in posterior.members])
        mixture = posterior.log_prob(theta, x)
    assert not torch.allclose(members[0], members[1])  # the members start apart
    torch.testing.assert_close(mixture, members.exp().mean(0).log())


def test_ensemble_draws_from_every_member_equally():
    posterior = _posterior(members=2, seed=1)
    x = torch.zeros(1, 3)
    # Shift the members far apart so that every draw shows which member made it.
    with torch.no_grad():
        for member, shift in zip(posterior.members, (-20.0, 20.0), strict=True):
            member.flow.base.loc.add_(shift)  # zuko's standard normal base, as a buffer
        theta, log_q = posterior.sample_and_log_prob(x, 4000)
    torch.testing.assert_close(log_q, posterior.log_prob(theta, x))
    fraction = (theta[:, 0, 0] > 0).float().mean().item()
    # Binomial(4000, 1/2) has standard deviation 0.008: 0.05 is six of them.
    assert abs(fraction - 0.5) < 0.05


def test_ensemble_draws_follow_their_own_observation():
    """Draws for observation n come from q(theta | x_n), not from another row's conditional.

    Under its own conditional a sample's mean log-density exceeds that under another's by their
    KL divergence; the observations are far apart, so a mix-up of rows would reverse the order.
    """
    posterior = _posterior(members=3, seed=2)
    x = torch.tensor([[-30.0, 0.0, 30.0], [30.0, 0.0, -30.0]])
    with torch.no_grad():
        theta, _ = posterior.sample_and_log_prob(x, 2000)  # (M, 2, D)
        own = posterior.log_prob(theta, x).mean(0)
        swapped = posterior.log_prob(theta, x.flip(0)).mean(0)
    assert torch.all(own > swapped + 1.0), (own, swapped)


def test_a_model_of_another_task_is_refused(posterior, tmp_path, capsys):
    from pipeline import cli
    from pipeline.models.posterior import save_posterior
    from pipeline.observations import make_observations
    from pipeline.tasks import get_task

    save_posterior(posterior, tmp_path / "model", {"task": "two_moons"})
    make_observations(get_task("slcp"), 1, 0, 1, tmp_path / "obs.h5")
    out = tmp_path / "samples.h5"
    model, observations = str(tmp_path / "model"), str(tmp_path / "obs.h5")
    args = ["sample", "--model", model, "--observations", observations]
    assert cli.main([*args, "--num-samples", "10", "--out", str(out)]) == 2
    assert "holds observations of task 'slcp', but" in capsys.readouterr().err
    assert not out.exists()


def test_samples_memory_or_disk_cannot_hold_are_refused_before_sampling(tmp_path, monkeypatch):
    from pipeline import resources, sampling

    sampling.check_sample_size(5, 1000, 2, tmp_path / "s.h5")  # 60 kB: fine
    monkeypatch.setattr(resources, "available_memory", lambda: 10**6)
    with pytest.raises(ValueError, match=r"take 60.0 MB, more than the 500.0 kB half the avail"):
        sampling.check_sample_size(5, 10**6, 2, tmp_path / "s.h5")


def test_a_test_set_sharing_rows_with_the_training_data_is_refused():
    """A stack of rounds records its seeds per round, and an import its archive and rows: a
    test set of a training round's seed, or of rows the model was trained on, repeats training
    rows whatever file holds them."""
    stack = {"num_simulations": 900, "rounds": [{"seed": 7}, {"seed": 8}]}
    document = {"data": {"seeds": [7, 8]}}
    with pytest.raises(ValueError, match="simulated with seed 7, a seed of the data"):
        sampling.check_held_out("t.h5", stack, document, "model")
    sampling.check_held_out("t.h5", {**stack, "rounds": [{"seed": 9}]}, document, "model")

    def imported(start: int, stop: int, sha: str = "ab12") -> dict:
        source = {"role": "x", "sha256": sha, "member": "x"}
        attrs = {"num_simulations": stop - start, "imported": True, "sources": [source]}
        return {**attrs, "index_start": start, "index_stop": stop}

    trained = {"data": {"seeds": [], "imported": storage.imported_rows(imported(0, 9000))}}
    with pytest.raises(ValueError, match="rows 8500-9999 .* share rows 8500-8999"):
        sampling.check_held_out("test.h5", imported(8500, 10_000), trained, "model")
    sampling.check_held_out("test.h5", imported(9000, 10_000), trained, "model")
    sampling.check_held_out("test.h5", imported(0, 9000, sha="cd34"), trained, "model")
    # An import recorded before members were resolved (none, or as typed) may be that array.
    old = {"data": {"seeds": [], "imported": {"x": "ab12:", "rows": [0, 9000]}}}
    with pytest.raises(ValueError, match="share rows 8500-8999"):
        sampling.check_held_out("test.h5", imported(8500, 10_000), old, "model")
    typed = {"data": {"seeds": [], "imported": {"x": "ab12:/x", "rows": [0, 9000]}}}
    with pytest.raises(ValueError, match="share rows 8500-8999"):
        sampling.check_held_out("test.h5", imported(8500, 10_000), typed, "model")
    other = {"data": {"seeds": [], "imported": {"x": "ab12:y", "rows": [0, 9000]}}}
    sampling.check_held_out("test.h5", imported(8500, 10_000), other, "model")
    # Synthetic observations drawn with a training seed: observation j is training row j x B.
    observed = {"seed": 7, "num_reference_samples": 100, "task": "two_moons"}
    with pytest.raises(ValueError, match=r"drawn with seed 7, a seed of the data model"):
        sampling.check_held_out("observations.h5", observed, document, "model")
    sampling.check_held_out("observations.h5", {**observed, "seed": 3}, document, "model")


def test_a_regions_membership_is_decided_at_the_tolerance_truncate_used(tmp_path):
    """truncate draws an FMPE region's threshold with densities at the default ODE tolerance;
    sample may draw at another, but must decide membership as truncate and simulate did."""
    from pipeline.models.flow_matching import TOLERANCE
    from pipeline.models.posterior import save_posterior

    spec = PosteriorSpec(parameter_names=("a", "b"), x_shape=(3,), method="fmpe", ensemble=1)
    posterior = NeuralPosterior(spec).eval()
    save_posterior(posterior, tmp_path / "model", {"task": "two_moons"})
    assert sampling.region_judge(posterior, tmp_path / "model") is posterior
    posterior.set_ode_tolerance(1e-2)
    judge = sampling.region_judge(posterior, tmp_path / "model")
    assert judge is not posterior
    assert [member.flow.tolerance for member in judge.members] == [TOLERANCE]
    npe = _posterior()
    assert sampling.region_judge(npe, tmp_path / "no-model") is npe
