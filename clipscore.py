"""
CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"): how
well a caption fits its picture by CLIP's own judgment, with no reference caption needed.

    CLIP-S(c, v)       = w * max(cos(E_text("A photo depicts " + c), E_image(v)), 0),   w = 2.5
    RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max over r in R of cos(E_text(c), E_text(r)), 0)

E_text and E_image are CLIP's projected text and image embeddings; every text, references included, is
prefixed "A photo depicts " and cut to CLIP's 77 positions, as the paper's code (jmhessel/clipscore) does;
a corpus score is the mean over images. (The paper clips the reference similarity at 0, its code does not:
they differ only for a caption less like every reference than a random text, and we follow the paper.)

The CLIP is the checkpoint's own: its text tower and both projections, from the full CLIPModel checkpoint
that its vision tower comes from (every OpenAI and LAION CLIP on the hub is one), with its tokenizer files.
No second pass over the pictures: CLIP's image embedding follows from the stored features, as CLIP computes
it, visual_projection(post_layernorm(the class token of last_hidden_state)). A video's is the mean of its
real frames' embeddings.
"""
import os

import torch
import torch.nn.functional as F

from common import InputError, first_line

PREFIX = 'A photo depicts '
W = 2.5


class ClipScorer:
    """CLIP-S and RefCLIP-S of captions, with the text tower and projections of the CLIP named `name`."""

    def __init__(self, name, device='cpu'):
        from transformers import CLIPModel, CLIPTokenizer
        from weights import check_checkpoint_kind, from_pretrained, quiet_transformers
        quiet_transformers()
        check_checkpoint_kind(name, ('clip',), 'a full CLIPModel, whose text tower CLIP-S needs')
        no_files = f'{name}: no CLIP tokenizer files (vocab.json, merges.txt) to read captions with'
        missing = [f for f in ('vocab.json', 'merges.txt') if not os.path.isfile(os.path.join(name, f))]
        if os.path.isdir(name) and missing:  # looked for here: transformers' own errors differ by version
            raise InputError(f"{no_files} (no {', '.join(missing)})")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError, ImportError) as e:  # the hub has no tokenizer files for it
            raise InputError(f'{no_files} ({first_line(e)})')
        self.clip = from_pretrained(CLIPModel, name, 'a CLIP model').to(device).eval()
        self.device = device

    def float32(self):
        """CLIP-S in float32 whatever autocast a script decodes under: one caption, one score, in every script."""
        return torch.autocast(torch.device(self.device).type, enabled=False)

    @torch.no_grad()
    def image_embeddings(self, features, frame_mask=None):
        """Unit image embeddings [B, D] of stored CLIP features [B, T, N, Dv] (last_hidden_state of each frame)
        with the mask of real frames [B, T]: a video's is its real frames' mean."""
        vision = self.clip.vision_model
        with self.float32():
            pooled = vision.post_layernorm(features[:, :, 0].to(self.device, torch.float32))  # the class tokens
            frames = F.normalize(self.clip.visual_projection(pooled), dim=-1)  # [B, T, D]
        weights = (torch.ones(frames.shape[:2]) if frame_mask is None else frame_mask.float()).to(self.device)
        return F.normalize((frames * weights[..., None]).sum(1), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts):
        """Unit text embeddings [n, D] of "A photo depicts " + each text, cut to CLIP's 77 positions."""
        tokens = self.tokenizer([PREFIX + text for text in texts], padding=True, truncation=True, max_length=77,
                                return_tensors='pt').to(self.device)
        with self.float32():
            out = self.clip.get_text_features(input_ids=tokens['input_ids'], attention_mask=tokens['attention_mask'])
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)  # (transformers 4 or 5)

    def clip_s(self, image_embeddings, captions):
        """CLIP-S [B] of one caption per image."""
        similarity = (image_embeddings * self.text_embeddings(captions)).sum(-1)
        return W * similarity.clamp(min=0)

    def candidate_scores(self, features, frame_mask, candidates):
        """CLIP-S [[float]] of each image's candidates [[str]], all in one pass of the text tower (features
        [B, T, N, Dv] and frame_mask [B, T] as image_embeddings takes them)."""
        images = self.image_embeddings(features, frame_mask)
        counts = torch.tensor([len(captions) for captions in candidates], device=images.device)
        flat = self.clip_s(images.repeat_interleave(counts, 0), [c for captions in candidates for c in captions])
        return [scores.tolist() for scores in flat.split(counts.tolist())]

    def ref_clip_s(self, clip_s, captions, references):
        """RefCLIP-S [B] of one caption per image, from its CLIP-S [B] and the image's references [[str]]."""
        candidates = self.text_embeddings(captions)
        flat = self.text_embeddings([r for refs in references for r in refs])
        best, start = [], 0
        for i, refs in enumerate(references):
            best.append((flat[start:start + len(refs)] @ candidates[i]).max())
            start += len(refs)
        text_text = torch.stack(best).clamp(min=0)
        return torch.where(clip_s + text_text > 0, 2 * clip_s * text_text / (clip_s + text_text), 0.0)


def check_rerank(rerank, decoding, num_samples):
    """The rerank setting of sample.py and eval_bleu.py, in one line before anything loads."""
    if rerank not in ('', 'clip'):
        raise InputError(f"rerank must be '' or 'clip', not {rerank!r}")
    if rerank and not (decoding == 'beam' or num_samples > 1):
        raise InputError(f'rerank=clip chooses among candidates: decoding=beam (its n-best) or sample with '
                         f'num_samples > 1, not {decoding} decoding of one')


def clip_scorer_of(vision_model, device='cpu'):
    """(ClipScorer or None, why not): a checkpoint without a text tower or tokenizer files gets no CLIP-S,
    and a line saying so."""
    try:
        return ClipScorer(vision_model, device), None
    except InputError as e:
        return None, str(e)
