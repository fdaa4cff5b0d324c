"""CLIPScore (Hessel et al. 2021) against its definition computed by hand with transformers' CLIPModel and
CLIPTokenizer; reranking by it in sample.py and eval_bleu.py."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipscore import ClipScorer, clip_scorer_of
from conftest import run_script
from media import clip_preprocess, load_rgb
from prepare_shapes import draw_weights

REAL_TOKENIZER = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'clip_tokenizer')


@pytest.fixture(scope='module')
def real_tokenizer_clip(tmp_path_factory):
    """A tiny full CLIPModel with OpenAI's real tokenizer files beside it (49,408 tokens), as on the hub."""
    if not os.path.isdir(REAL_TOKENIZER):
        pytest.skip('no ../shared/clip_tokenizer beside the repository')
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=49408, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407),
                        projection_dim=16)
    path = tmp_path_factory.mktemp('clip_real_tokenizer')
    # weights drawn by prepare_shapes.py: a seed whose text and image embeddings of the test's pictures are at
    # positive cosines, whatever transformers' version
    draw_weights(CLIPModel(config), seed=5).save_pretrained(path)
    for name in ('vocab.json', 'merges.txt', 'tokenizer_config.json'):
        shutil.copy(os.path.join(REAL_TOKENIZER, name), path / name)
    return str(path)


def test_clip_s_is_float32_under_the_autocast_a_script_decodes_in(real_tokenizer_clip):
    """eval_bleu.py reranks under the decoding autocast, then scores outside it: both must be one number."""
    scorer = ClipScorer(real_tokenizer_clip)
    features, texts = torch.randn(2, 1, 17, 32), ['a red square', 'two blue circles on a white background']
    plain = scorer.image_embeddings(features), scorer.text_embeddings(texts)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        under = scorer.image_embeddings(features), scorer.text_embeddings(texts)
    assert all(torch.equal(a, b) for a, b in zip(plain, under))


def by_hand(clip_dir, pixels, captions, references):
    """CLIP-S and RefCLIP-S as the paper defines them, from transformers' own CLIPModel.get_image_features and
    get_text_features, each text "A photo depicts " + it, tokenized and cut to 77 tokens as OpenAI's
    clip.tokenize(truncate=True) does (the first 76, then <|endoftext|>)."""
    from transformers import CLIPModel, CLIPTokenizer
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    pooled = lambda out: out if torch.is_tensor(out) else out.pooler_output

    def text(t):
        ids = tokenizer('A photo depicts ' + t)['input_ids']
        ids = ids if len(ids) <= 77 else ids[:76] + [tokenizer.eos_token_id]
        with torch.no_grad():
            return F.normalize(pooled(clip.get_text_features(input_ids=torch.tensor([ids])))[0], dim=-1)
    with torch.no_grad():
        images = F.normalize(pooled(clip.get_image_features(pixel_values=pixels)), dim=-1)
    clip_s, ref_clip_s = [], []
    for image, caption, refs in zip(images, captions, references):
        c = text(caption)
        s = 2.5 * max(float(image @ c), 0.0)
        r = max(max(float(text(ref) @ c) for ref in refs), 0.0)
        clip_s.append(s)
        ref_clip_s.append(2 * s * r / (s + r) if s + r > 0 else 0.0)
    return clip_s, ref_clip_s


def test_clip_s_and_ref_clip_s_are_the_papers_definition(real_tokenizer_clip):
    """On three pictures, from the CLIP features the captioner stores (no second pass over the pixels), with a
    caption longer than CLIP's 77 positions among them."""
    from weights import load_vision
    rng = np.random.default_rng(0)
    pixels = torch.tensor(np.stack([clip_preprocess(__import__('PIL.Image').Image.fromarray(
        rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)), 32) for _ in range(3)]))
    with torch.no_grad():
        stored = load_vision(real_tokenizer_clip)(pixel_values=pixels).last_hidden_state[:, None]  # [B, 1, N, D]
    captions = ['a dog on a couch', 'two red squares ' * 40, 'a photo']
    references = [['a dog asleep', 'a couch'], ['squares', 'a red square'], ['a cat']]
    scorer = ClipScorer(real_tokenizer_clip)
    clip_s = scorer.clip_s(scorer.image_embeddings(stored), captions)
    ref_clip_s = scorer.ref_clip_s(clip_s, captions, references)
    expected_clip_s, expected_ref = by_hand(real_tokenizer_clip, pixels, captions, references)
    assert clip_s.tolist() == pytest.approx(expected_clip_s, abs=1e-5)
    assert ref_clip_s.tolist() == pytest.approx(expected_ref, abs=1e-5)
    assert len(set(np.round(expected_clip_s, 4))) == 3 and 0 < min(expected_ref)  # not all the same, not all 0
    # as prepare_coco.py stores them, in float16: the embeddings move by float16's rounding only
    rounded = scorer.image_embeddings(stored.half())
    assert (rounded - scorer.image_embeddings(stored)).abs().max() < 2e-3


def test_a_video_is_the_mean_of_its_real_frames(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir)
    frames = torch.randn(1, 3, 17, 32)
    mask = torch.tensor([[True, True, False]])
    each = scorer.image_embeddings(frames[0, :2, None])  # the two real frames as images
    assert torch.allclose(scorer.image_embeddings(frames, mask)[0], F.normalize(each.sum(0), dim=-1), atol=1e-6)


def test_no_text_tower_or_tokenizer_no_clip_s_and_one_line_saying_so(tmp_path, tiny_clip_dir, run_dir, data_dir,
                                                                    capsys):
    from transformers import CLIPVisionModel
    CLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path / 'vision_only')
    scorer, why = clip_scorer_of(str(tmp_path / 'vision_only'))
    assert scorer is None and why == (f'{tmp_path}/vision_only: a clip_vision_model checkpoint, not a full CLIPModel, '
                                      'whose text tower CLIP-S needs')
    shutil.copytree(tiny_clip_dir, tmp_path / 'no_tokenizer')
    os.remove(tmp_path / 'no_tokenizer' / 'vocab.json')
    scorer, why = clip_scorer_of(str(tmp_path / 'no_tokenizer'))
    assert scorer is None and why.startswith(f'{tmp_path}/no_tokenizer: no CLIP tokenizer files (vocab.json, '
                                             'merges.txt) to read captions with')
    # eval_bleu.py with a CLIP that has no tokenizer: its scores without CLIP-S, and the reason on stderr
    checkpoint = torch.load(f'{run_dir}/best.pt', weights_only=True)
    checkpoint['model_config']['vision_model'] = str(tmp_path / 'no_tokenizer')
    torch.save(checkpoint, tmp_path / 'best.pt')
    shutil.copytree(data_dir, tmp_path / 'data')
    meta = json.load(open(tmp_path / 'data' / 'meta.json'))
    json.dump(dict(meta, vision_model=str(tmp_path / 'no_tokenizer')), open(tmp_path / 'data' / 'meta.json', 'w'))
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f"--data_dir={tmp_path / 'data'}", '--split=val',
                      '--decoding=greedy', '--max_new_tokens=4', '--device=cpu') is None
    assert capsys.readouterr().err.strip().splitlines()[-1] == f'eval_bleu.py: no CLIP-S: {why}'
    assert 'CLIP-S' not in json.load(open(tmp_path / 'metrics_val_greedy.json'))


def test_rerank_keeps_the_candidate_of_the_highest_clip_s(tmp_path, run_dir, data_dir, tiny_clip_dir):
    """eval_bleu.py --rerank=clip with the beam's 3-best, and sample.py with 4 samples: each keeps the candidate
    whose CLIP-S, computed by hand from transformers' CLIPModel on the picture, is the highest."""
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val',
                      '--beam_width=3', '--rerank=clip', '--max_new_tokens=6', '--device=cpu') is None
    chosen = json.load(open(tmp_path / 'captions_val_beam3_clipreranked.json'))
    metrics = json.load(open(tmp_path / 'metrics_val_beam3_clipreranked.json'))
    assert metrics['rerank'] == 'clip' and metrics['candidates'] == 3 and 0 <= metrics['CLIP-S'] <= 2.5
    pictures = os.path.join(os.path.dirname(data_dir), 'val')
    for entry in chosen:
        pixels = torch.tensor(clip_preprocess(load_rgb(entry['file']), 32))[None]
        scores, _ = by_hand(tiny_clip_dir, pixels.expand(3, -1, -1, -1), entry['candidates'], [['x']] * 3)
        assert len(entry['candidates']) == 3 and entry['caption'] == entry['candidates'][entry['chosen']]
        assert scores[entry['chosen']] >= max(scores) - 1e-3  # the best, or one as good to float16's rounding
    out = tmp_path / 'sampled.json'
    assert run_script('sample.py', f'--out_dir={tmp_path}', f'--images={pictures}', '--decoding=sample',
                      '--num_samples=4', '--rerank=clip', '--max_new_tokens=6', '--num_workers=0', '--device=cpu',
                      f'--json={out}') is None
    for entry in json.load(open(out)):
        pixels = torch.tensor(clip_preprocess(load_rgb(entry['image']), 32))[None]
        scores, _ = by_hand(tiny_clip_dir, pixels.expand(4, -1, -1, -1), entry['candidates'], [['x']] * 4)
        assert entry['candidates_clip_s'] == pytest.approx(scores, abs=2e-3)  # features stored in float16
        assert entry['captions'] == [entry['candidates'][entry['chosen']]]
        assert scores[entry['chosen']] >= max(scores) - 1e-3 and len(set(entry['candidates'])) > 1
    # eval_bleu.py's samples: their files are named by their count, and more than one sample needs a choice
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val',
                      '--decoding=sample', '--num_samples=3', '--max_new_tokens=6', '--device=cpu') == (
        "eval_bleu.py: num_samples=3 needs rerank=clip to choose one caption of each image's samples to score")
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val',
                      '--decoding=sample', '--num_samples=3', '--rerank=clip', '--max_new_tokens=6',
                      '--device=cpu') is None
    assert json.load(open(tmp_path / 'metrics_val_sample3_clipreranked.json'))['candidates'] == 3
