"""Self-critical sequence training: its reward, its advantages, its loss, and train.py --objective=scst."""
import shutil

import numpy as np
import pytest
import tiktoken
import torch

from conftest import TEXT_DIM, run_script
from common import EOT
from data import IGNORE_INDEX
from decode import generate, prefill
from weights import build_captioner
from eval_bleu import CiderD, tokenize_all
from test_eval_bleu import coco_mini_images, needs_java, needs_real_data
from test_train import logs, train, train_args
from scst import CiderReward, leave_one_out_advantages, policy_gradient_loss, sample_log_probs, sampled_batch


@needs_java
@needs_real_data
@pytest.mark.parametrize('max_new_tokens', [1000, 12])
def test_reward_is_coco_captions_cider_d_of_each_sample_its_end_a_word(max_new_tokens):
    """Two samples of each of 80 real COCO images (its own first caption and another image's), rewarded
    against the image's other captions: each reward is the toolkit's CIDEr-D of that caption, its Java
    tokenizer and all, with the idf of all the images' references, where every reference and every sample that
    ended (shorter than max_new_tokens) has one more word at its end (Rennie et al. 2017; self-critical.pytorch)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    hypotheses, references = coco_mini_images()  # 80 right captions, then 80 wrong ones
    images = len(hypotheses) // 2
    records = [dict(captions=refs) for refs in references[:images]]
    encoder = tiktoken.get_encoding('gpt2')
    samples = [encoder.encode(hypotheses[i + j * images]) for i in range(images) for j in (0, 1)]
    rewards = CiderReward(records)(samples, np.arange(images), max_new_tokens)
    assert rewards.shape == (images, 2)
    end = ' thisistheend'  # any word that no caption has
    gts = PTBTokenizer().tokenize({i: [{'caption': r} for r in r['captions']] for i, r in enumerate(records)})
    gts = {i: [r + end for r in refs] for i, refs in gts.items()}
    ended = np.array([len(s) < max_new_tokens for s in samples]).reshape(images, 2)
    assert ended.all() if max_new_tokens == 1000 else 0.2 < ended.mean() < 0.8
    for j in (0, 1):
        res = PTBTokenizer().tokenize({i: [{'caption': hypotheses[i + j * images]}] for i in range(images)})
        res = {i: [words[0] + end * bool(ended[i, j])] for i, words in res.items()}
        _, expected = Cider().compute_score(gts, res)
        assert np.abs(rewards[:, j] - expected).max() <= 1e-6
    assert (rewards[:, 0] > rewards[:, 1]).mean() > 0.9  # an image's own caption mostly wins
    # a batch of some of the images, in any order, gets the same rewards: each sample is scored against
    # its own image's references, with the idf of all of them
    some = np.random.default_rng(0).permutation(images)[:20]
    some_samples = [samples[2 * i + j] for i in some for j in (0, 1)]
    assert np.array_equal(CiderReward(records)(some_samples, some, max_new_tokens), rewards[some])


@needs_real_data
def test_the_end_word_punishes_a_caption_that_stops_mid_phrase():
    """The issue's measurement on the 80 real COCO photos (first caption against the other four): cut after
    its last function word ("a man riding a wave on top of a"), a caption loses 0.153 of CIDEr-D on average
    without the end word, and 0.220 with it (the issue's function words: a, an, the, of, on, in, with, and, to, at)."""
    function_words = {'a', 'an', 'the', 'of', 'on', 'in', 'with', 'and', 'to', 'at'}
    hypotheses, references = coco_mini_images()
    images = len(hypotheses) // 2
    records = [dict(captions=refs) for refs in references[:images]]
    reward = CiderReward(records)
    words = tokenize_all(hypotheses[:images])
    cut = [' '.join(w[:max(i for i, word in enumerate(w) if word in function_words) + 1]) for w in words]
    assert all(c.split()[-1] in function_words for c in cut)
    encoder = tiktoken.get_encoding('gpt2')
    samples = [encoder.encode(text) for pair in zip([' '.join(w) for w in words], cut) for text in pair]
    with_end = reward(samples, np.arange(images), max_new_tokens=1000)
    drop_with_end = (with_end[:, 0] - with_end[:, 1]).mean()
    without = CiderD([[r[:-1] for r in refs] for refs in reward.references])
    drop_without = np.mean([np.subtract(*without.image_scores([w, c.split()], [r[:-1] for r in refs]))
                            for w, c, refs in zip(words, cut, reward.references)])
    assert drop_without == pytest.approx(0.153, abs=5e-4) and drop_with_end == pytest.approx(0.220, abs=5e-4)


def test_advantages_are_each_reward_minus_the_mean_of_the_others():
    rewards = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    assert leave_one_out_advantages(rewards).tolist() == [[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]
    random = np.random.default_rng(0).random((50, 5))
    assert np.abs(leave_one_out_advantages(random).sum(1)).max() < 1e-12


# sampled captions of at most 6 tokens: ended ones (shorter: <|endoftext|> is their last target), an
# empty one (it ended at once) and ones cut at 6 (no <|endoftext|>)
SAMPLES = [[464, 1263, 3797], [], [32, 2266, 6333, 319, 262, 1364], [11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45]]


@pytest.fixture
def captioner(tiny_config):
    torch.manual_seed(0)
    model = build_captioner(tiny_config)
    torch.manual_seed(1)  # gates away from zero, so that the image matters to the captions
    for block in model.xattn.values():
        torch.nn.init.normal_(block.attn_gate, std=0.5)
        torch.nn.init.normal_(block.ff_gate, std=0.5)
    return model


def decoding_log_prob(model, features, sample, max_new_tokens):
    """A sample's log-probability as decoding sees it: token by token through the KV cache."""
    with torch.no_grad():
        logits, state = prefill(model, features[None], None, max_new_tokens)
        total = 0.0
        for token in sample + [EOT] * (len(sample) < max_new_tokens):
            total += logits[0].log_softmax(-1)[token].item()
            logits = model.step(torch.tensor([token]), state.media_kv, state.cache)
    return total


def test_sample_log_probs_are_those_of_decoding(captioner):
    """The training forward's log-probability of each sample, padded into one batch, is the sum decoding
    gave its tokens: every sampled token once, <|endoftext|> only where the sample ended, no padding."""
    features = torch.randn(len(SAMPLES), 17, 32)
    log_probs = sample_log_probs(captioner, features, None,
                                 *(torch.from_numpy(a) for a in sampled_batch(SAMPLES, max_new_tokens=6)))
    expected = [decoding_log_prob(captioner, f, s, 6) for f, s in zip(features, SAMPLES)]
    assert log_probs.shape == (len(SAMPLES),)
    assert np.abs(log_probs.detach().numpy() - expected).max() < 1e-4  # sums of ~30 float32 log-softmaxes


def test_sample_log_probs_under_bf16_autocast_come_from_a_float32_head(captioner):
    """Samples are drawn from float32 logits (decoding's head), so their log-probabilities in the loss must be
    too: under bf16 autocast they equal the log-softmax, in float64, of the final hidden states times the
    embedding. A bf16 head is off by about 0.1 per caption."""
    features = torch.randn(len(SAMPLES), 17, 32)
    tokens, targets, positions = (torch.from_numpy(a) for a in sampled_batch(SAMPLES, max_new_tokens=6))
    hidden = []
    hook = captioner.gpt.ln_f.register_forward_hook(lambda module, inputs, output: hidden.append(output))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        log_probs = sample_log_probs(captioner, features, None, tokens, targets, positions)
    hook.remove()
    h = hidden[0][:, captioner.prefix_len:].double()
    vocab = captioner.gpt.config.vocab_size
    logits = h @ captioner.gpt.wte.weight[:vocab].double().T
    per_token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (per_token * (targets != IGNORE_INDEX)).sum(1)
    assert (log_probs.double() - expected).abs().max() < 1e-4


def test_one_step_raises_the_log_probability_of_the_best_sample(captioner):
    """Five samples of one image: one gradient step on the SCST loss makes the best-rewarded sample more
    likely, and more so than any other; the worst one less likely."""
    features = torch.randn(1, 17, 32).expand(len(SAMPLES), -1, -1)
    rewards = np.array([[0.3, 0.2, 1.5, 0.4, 0.0]])
    batch = [torch.from_numpy(a) for a in sampled_batch(SAMPLES, max_new_tokens=6)]
    before = sample_log_probs(captioner, features, None, *batch).detach()
    optimizer = torch.optim.SGD([p for p in captioner.parameters() if p.requires_grad], lr=1e-3)
    policy_gradient_loss(captioner, features, None, SAMPLES, rewards, max_new_tokens=6).backward()
    optimizer.step()
    change = sample_log_probs(captioner, features, None, *batch).detach() - before
    assert change.argmax() == 2 and change[2] > 0
    assert change.argmin() == 4 and change[4] < 0


SCST = ('--objective=scst', '--scst_samples=3', '--eval_images=4', '--learning_rate=1e-3', '--warmup_frac=0')


def test_scst_on_one_process_and_two_ranks_logs_rewards_and_gates(tmp_path, run_dir, data_dir, tiny_clip_dir,
                                                          tiny_gpt2_dir):
    """From the session's cross-entropy run: one process, and two DDP ranks sampling their halves of the
    same micro batches, take the same steps; the log has each step's mean reward and length and every
    gate's tanh."""
    # 4 steps: sampling reaches words of probability 1e-5 and less, and which of them a draw lands on moves with
    # the weights' last bits, which two processes and one round differently (by 1e-7 after 3 steps here)
    common = [*SCST, f'--init_from={run_dir}/ckpt.pt', '--max_iters=4', '--eval_interval=2']
    records = train(tmp_path / 'one', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common, '--batch_size=2',
                    '--gradient_accumulation_steps=2')
    train(tmp_path / 'ddp', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common, '--batch_size=2', ranks=2)
    steps = [r for r in records if 'reward' in r]
    assert [r['iter'] for r in steps] == list(range(1, 5))
    assert steps[0]['loss'] == pytest.approx(first_step_loss(run_dir, data_dir), rel=1e-5)
    assert np.allclose([r['loss'] for r in steps], [r['loss'] for r in logs(tmp_path / 'ddp') if 'loss' in r],
                       rtol=1e-5, atol=1e-6)
    assert all(0 < r['reward'] < 10 and 0 < r['length'] <= 20 for r in steps)
    assert np.allclose([r['reward'] for r in steps], [r['reward'] for r in logs(tmp_path / 'ddp') if 'reward' in r])
    weights = [torch.load(tmp_path / run / 'ckpt.pt', weights_only=True)['model'] for run in ('one', 'ddp')]
    for name in weights[0]:
        one, other = weights[0][name], weights[1][name]
        if name.endswith('c_attn.bias'):
            # the key bias adds the same to every attention score of a query, which softmax ignores: its
            # gradient is rounding noise, which Adam scales up to steps of the learning rate's size
            one, other = (torch.cat([w[:TEXT_DIM], w[2 * TEXT_DIM:]]) for w in (one, other))
        # Adam's first steps are about lr * sign(gradient): a weight whose gradient is rounding noise can move by
        # a few 1e-5 one way in one process and the other way on two ranks; a wrong shard or a missed micro
        # batch moves every weight by about the learning rate (1e-3)
        assert torch.allclose(one, other, atol=1e-4), name
    start = torch.load(f'{run_dir}/ckpt.pt', weights_only=True)['model']
    assert not torch.equal(weights[0]['xattn.0.attn_gate'], start['xattn.0.attn_gate'])  # it trained
    gates = {i: {g: round(float(weights[0][f'xattn.{i}.{g}_gate'].tanh()), 4) for g in ('attn', 'ff')}
             for i in '012'}
    assert steps[-1]['gates'] == gates
    assert [r['iter'] for r in records if 'val_cider' in r] == [0, 2, 4]  # the start, then every 2 steps


def test_every_micro_batch_of_every_step_samples_with_its_own_seed(tmp_path, run_dir, data_dir, tiny_clip_dir,
                                                                   tiny_gpt2_dir, monkeypatch):
    """3 steps of 2 micro batches: 6 generators, each seeded differently (a seed without the iteration draws
    the same numbers at every step; one without the micro batch's place, the same in both halves)."""
    import decode
    seeds, sample_token = [], decode.sample_token

    def recording_sample_token(logits, temperature, top_k, top_p, generator):
        if not seeds or seeds[-1][0] is not generator:
            seeds.append((generator, generator.initial_seed()))
        return sample_token(logits, temperature, top_k, top_p, generator)
    monkeypatch.setattr(decode, 'sample_token', recording_sample_token)
    assert run_script('train.py', *train_args(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir), *SCST,
                      f'--init_from={run_dir}/ckpt.pt', '--max_iters=3', '--eval_interval=100', '--batch_size=2',
                      '--gradient_accumulation_steps=2') is None
    assert len(seeds) == 6 and len({seed for _, seed in seeds}) == 6


def first_step_loss(run_dir, data_dir):
    """The loss of SCST's first step as the test's runs take it (4 images of the epoch's order in 2 micro
    batches of 2, 3 samples each), computed here: the mean over the 12 samples of -advantage x
    log-probability."""
    from data import Captions
    from weights import load_captioner
    from scst import sample_seed
    from train import epoch_order
    model, _ = load_captioner(f'{run_dir}/ckpt.pt')
    data = Captions(data_dir, 'train', 48)
    reward = CiderReward(data.records())
    order = epoch_order(data.media_count, 1337, 0)
    total = 0.0
    for first in (0, 2):
        images = order[first:first + 2]
        features, mask = (torch.from_numpy(a).repeat_interleave(3, 0) for a in data.features(images))
        generator = torch.Generator().manual_seed(sample_seed(1337, 0, first))
        samples = generate(model, features, mask, 20, decoding='sample', generator=generator)
        total += policy_gradient_loss(model, features, mask, samples, reward(samples, images, 20), 20).item()
    return total / 12


@pytest.mark.parametrize('ciders, best_iter', [([0.5, 1.0, 3.0, 2.0], 4), ([0.5, 3.0, 1.0, 2.0], 2),
                                               ([3.0, 1.0, 2.0, 3.0], 0)])
def test_scst_best_checkpoint_is_that_of_the_best_validation_cider(ciders, best_iter, tmp_path, run_dir, data_dir,
                                                                   tiny_clip_dir, tiny_gpt2_dir, monkeypatch):
    """With the validation CIDEr-D of the start and of three evaluations scripted, best.pt is the one of the
    best: a choice by validation loss (one iteration, whatever the script) fails one of the scripts, and the
    starting checkpoint stays best.pt unless a later evaluation beats it (a tie does not)."""
    import eval_bleu
    scripted = iter(ciders)
    monkeypatch.setattr(eval_bleu, 'score', lambda captions, references: {'BLEU-4': 0.5, 'CIDEr-D': next(scripted)})
    assert run_script('train.py', *train_args(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir), *SCST,
                      f'--init_from={run_dir}/ckpt.pt', '--max_iters=6', '--eval_interval=2',
                      '--batch_size=4') is None
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['iter_num'] == best_iter and best['best_val_cider'] == 3.0
    start = torch.load(f'{run_dir}/ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(best['model'][k], start[k]) for k in start) == (best_iter == 0)


@pytest.mark.parametrize('option, message', [
    ('--objective=rl', "train.py: objective must be 'xe' or 'scst', not 'rl'"),
    ('--scst_samples=1', 'train.py: scst_samples must be at least 2 (each sample is compared with the others), '
                         'not 1'),
    ('--eval_images=0', 'train.py: objective=scst needs eval_images > 0: its best.pt is the one of the best '
                        'validation CIDEr-D'),
    ('--scst_max_tokens=0', 'train.py: scst_max_tokens must be at least 1, not 0'),
    ('--init_from=pretrained', 'train.py: objective=scst trains a captioner further: give init_from a checkpoint '
                               'of cross-entropy training (or resume)'),
    ('--init_from=out/no.pt', "train.py: out/no.pt: no such checkpoint (init_from is 'pretrained', 'resume', a "
                              "checkpoint file or a model folder)"),
])
def test_bad_scst_settings_fail_in_one_line(option, message):
    assert run_script('train.py', '--objective=scst', '--eval_images=4', option) == message


def test_resuming_with_another_objective_fails_in_one_line(tmp_path, run_dir):
    shutil.copytree(run_dir, tmp_path / 'run')
    message = run_script('train.py', f"--out_dir={tmp_path / 'run'}", '--init_from=resume', *SCST)
    assert message == f"train.py: {tmp_path / 'run'}/ckpt.pt: a run with objective=xe; resume it with the same"
