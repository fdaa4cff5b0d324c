"""
A trained model as a folder to share, with no pickle in it: model.safetensors (the trained weights alone),
config.json (the model settings, which name the frozen CLIP and GPT-2 it needs, and what it was trained on) and
README.md (its model card, which eval_bleu.py adds its scores to), from a checkpoint of train.py:

    python export.py --checkpoint=out-shapes/best.pt --out=out-shapes/best

train.py writes out_dir/best/ beside each best.pt itself. sample.py and eval_bleu.py (--checkpoint=best) and
train.py (--init_from=out-shapes/best) read such a folder as they read a .pt checkpoint. It could sit on the
Hugging Face hub as any model folder does; nothing here reaches the hub, so only local folders are tested.
"""
import os

from common import InputError, check_writable, input_errors_exit
from data import read_meta, split_counts
from weights import read_checkpoint, save_model

# -----------------------------------------------------------------------------
checkpoint = ''  # a .pt file of train.py (its ckpt.pt or best.pt)
out = ''  # the folder to write
# -----------------------------------------------------------------------------

if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('export.py'):
        if not checkpoint or not out:
            raise InputError('give --checkpoint=FILE.pt and --out=FOLDER')
        check_writable(out)
        state = read_checkpoint(checkpoint)
        training = state.get('training')  # a model folder's record, kept; a .pt checkpoint's, rebuilt:
        if 'iter_num' in state:  # (its best_val_loss is the run's best so far, not always this iteration's)
            data_dir = state['train_config'].get('data_dir')
            meta = os.path.join(data_dir, 'meta.json') if data_dir else ''
            training = dict(data_dir=data_dir, splits=split_counts(read_meta(data_dir)) if os.path.isfile(meta) else {},
                            iter_num=state['iter_num'], scores=dict(best_val_loss_so_far=state['best_val_loss']))
        save_model(state['model'], state['model_config'], out, training, state.get('evaluations'))
    print(f'wrote {out}: model.safetensors ({len(state["model"])} tensors), config.json and README.md')
