"""
Self-critical sequence training (Rennie et al. 2017), in its now-standard form: k captions sampled
per image, each rewarded with its CIDEr-D minus the mean reward of the image's other samples (no
greedy baseline), and the policy gradient of their log-probabilities. train.py's SCST step samples
the captions with decode.generate, then rewards them and takes the loss with these.
"""
import numpy as np
import torch

import eval_bleu
from common import EOT, decode_caption, gpt2_tokenizer
from data import IGNORE_INDEX

# The end of a caption is a word of its reward, as Rennie et al. (2017) and self-critical.pytorch
# count it: every reference ends with it, and so does every sample that ended (not one cut at the
# token limit). A sample that stops at "... on a" then misses the n-grams "on a <end>" would need,
# and the end's document frequency comes from the references like every other word's. Upper case:
# no word of the tokenizer can be it (it lower-cases).
END_WORD = '<END>'


class CiderReward:
    """The CIDEr-D of sampled captions against their images' references: eval_bleu's CIDEr-D, the
    end of a caption counted as a word, with document frequencies from all the references of the
    split (computed once)."""

    def __init__(self, records):
        references = eval_bleu.tokenize_groups([r['captions'] for r in records])
        self.references = [[words + [END_WORD] for words in image] for image in references]
        self.cider = eval_bleu.CiderD(self.references)
        self.encoder = gpt2_tokenizer()

    def __call__(self, samples, image_ids, max_new_tokens):
        """Rewards [B, k] of samples [B * k token lists] of at most max_new_tokens (shorter ones
        ended): k consecutive ones per image of image_ids [B]."""
        k = len(samples) // len(image_ids)
        assert len(samples) == k * len(image_ids)
        words = eval_bleu.tokenize_all([decode_caption(self.encoder, s) for s in samples])
        words = [w + [END_WORD] * (len(s) < max_new_tokens) for w, s in zip(words, samples)]
        return np.array([self.cider.image_scores(words[i * k:(i + 1) * k], self.references[image])
                         for i, image in enumerate(image_ids)])


def leave_one_out_advantages(rewards):
    """rewards [B, k] -> each minus the mean of its image's k - 1 other rewards (an image's
    advantages sum to zero)."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdims=True) - rewards) / (k - 1)


def sample_seed(seed, iter_num, start):
    """The seed of a micro batch's sampling: a function of (seed, iteration, the micro batch's place
    in the global batch), so that a resumed run samples the same captions, and N processes the same
    as one accumulating the same micro batches."""
    return int(np.random.SeedSequence([seed, iter_num, start]).generate_state(1)[0])


def sampled_batch(samples, max_new_tokens):
    """tokens, targets [B, S] and the flat target positions [K] of sampled captions, laid out as
    Captions.batch lays out references. A sample that ended has <|endoftext|> as its last target;
    one cut at max_new_tokens has none (the model did not choose to end it there)."""
    S = max(map(len, samples)) + 1
    tokens = np.full((len(samples), S), EOT, dtype=np.int64)
    targets = np.full((len(samples), S), IGNORE_INDEX, dtype=np.int64)
    for row, sample in enumerate(samples):
        ended = len(sample) < max_new_tokens
        tokens[row, 1:len(sample) + 1] = sample
        targets[row, :len(sample) + ended] = sample + [EOT] * ended
    return tokens, targets, np.flatnonzero(targets != IGNORE_INDEX)


def sample_log_probs(model, features, mask, tokens, targets, positions):
    """The log-probability [B] of each sampled caption, the sum over its targets, with gradients."""
    _, token_losses = model(features, mask, tokens, targets, positions, reduction='none',
                            float32_head=True)
    # each target's log-probability in its place in [B, S] (0 elsewhere), then each row's sum: in a
    # fixed order, where index_add's atomic adds on a GPU would sum in any
    log_probs = torch.zeros(tokens.numel(), device=token_losses.device)
    log_probs = log_probs.index_put((positions,), -token_losses)
    return log_probs.view(tokens.shape).sum(1)


def policy_gradient_loss(model, features, mask, samples, rewards, max_new_tokens):
    """SCST's loss of samples [B * k] (k consecutive ones per row of features) with rewards [B, k]:
    the sum over the samples of -advantage x log-probability, whose gradient raises the
    log-probability of the samples better than their image's others and lowers that of the worse."""
    to_device = lambda array: torch.from_numpy(array).to(features.device)
    advantages = to_device(leave_one_out_advantages(rewards).ravel()).float()
    tokens, targets, positions = map(to_device, sampled_batch(samples, max_new_tokens))
    log_probs = sample_log_probs(model, features, mask, tokens, targets, positions)
    return -(advantages * log_probs).sum()
