"""The recipe that makes the demo's pretrained backbones (a release artifact, like downloaded weights).

    speechverse-jax demo-backbones --out DIR                     # profile 'full' (about 2 hours on 2 cores)
    speechverse-jax demo-backbones --profile quick --out DIR     # tiny backbones in a minute or two (tests)

`get_config(profile)`: the held-out split the backbones must never read (`split_seed`), the
tokenizer, the WavLM (architecture, on-the-fly espeak-ng data, CTC + voice objectives, steps),
the T5 (architecture, text-task phases, steps), and the quality gates measured on held-out dev
data. Every field is part of the shipped artifact's MANIFEST.json (`recipe`), and a test checks
that the shipped manifest equals this config. Why each choice: docs/demo_experiments.md.
"""

import ml_collections

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-us-nyc")  # every espeak-ng English voice (without mbrola)
# espeak-ng 1.51's voice variants by the gender it gives them ('Mr' is left out: its file name has a space)
MALE_VARIANTS = (
    "Alex", "Andy", "AnxiousAndy", "Demonic", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee",
    "Marco", "Mario", "Michael", "Mike", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky",
    "UniRobot", "adam", "announcer", "antonio", "benjamin", "boris", "caleb", "croak", "david", "ed", "edward",
    "edward2", "fast", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "klatt",
    "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo",
    "max", "michel", "miguel", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "robosoft",
    "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
    "travis", "victor", "whisper", "zac")
FEMALE_VARIANTS = ("Alicia", "Andrea", "Annie", "anika", "anikaRobot", "aunty", "belinda", "f1", "f2", "f3", "f4",
                   "f5", "grandma", "linda", "steph", "steph2", "steph3", "whisperf")

PROFILES = {
    "full": dict(wavlm_hidden=192, wavlm_layers=4, conv=64, wavlm_steps=(4000, 2000), wavlm_batch=8, narrow_steps=600,
                 t5_width=192, t5_layers=3, t5_steps=(1500, 1500, 3500), t5_batch=32, vocab=1000,
                 lm_width=192, lm_layers=6, lm_steps=(1000, 1000, 3000, 800, 300, 200),
                 eval_clips=200, probe_train=800, text_rows=200),
    "quick": dict(wavlm_hidden=32, wavlm_layers=2, conv=16, wavlm_steps=(6, 2), wavlm_batch=4, narrow_steps=4,
                  t5_width=32, t5_layers=1, t5_steps=(2, 2, 4), t5_batch=8, vocab=200,
                  lm_width=32, lm_layers=2, lm_steps=(2, 2, 4, 2, 2, 2),
                  eval_clips=8, probe_train=12, text_rows=8),
}


def _kws_phases(steps, mix):
    """Release 6's two phases for the LM: keyword spotting alone, then the task mix with KWS kept in.
    Interleaved with the other tasks (10-25% of batches), KWS sat at a coin toss for thousands of
    steps in releases 1-5. From release 5's LM, 300 batches of KWS alone took it to 96% on dev-like
    rows (a trial, docs/demo_experiments.md, Release 6). The T5 stayed at a coin toss through the
    same 300 steps, so release 6 keeps release 3's T5."""
    return [dict(steps=steps[0], warmup_steps=max(steps[0] // 20, 1), lr=5e-4, salad_words=(1, 8),
                 tasks=dict(kws=0.5, kws_random=0.5)),
            dict(steps=steps[1], warmup_steps=max(steps[1] // 20, 1), lr=2e-4, salad_words=(2, 12),
                 tasks=dict(mix, kws=0.15, kws_random=0.15))]


def get_config(profile="full"):
    profile = profile or "full"
    if profile not in PROFILES:
        raise ValueError(f"demo_backbones profile must be one of {sorted(PROFILES)}, got {profile!r}")
    p = PROFILES[profile]
    config = ml_collections.ConfigDict()
    config.profile = profile
    config.out = "outputs/demo_backbones"
    config.seed = 0
    config.split_seed = 0  # the corpus split (demo/corpus.py sentence_families) whose dev/test is held out
    config.tokenizer = dict(vocab_size=p["vocab"], character_coverage=1.0)  # 0.9995 made the "-" of non-speech <unk>
    config.checkpoint_every = 500 if profile == "full" else 4

    h = p["wavlm_hidden"]
    config.wavlm = dict(
        model=dict(hidden_size=h, num_hidden_layers=p["wavlm_layers"], num_attention_heads=4,
                   intermediate_size=h * 8 // 3, conv_dim=[p["conv"]] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
                   conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=False, feat_extract_norm="layer",
                   do_stable_layer_norm=True, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8,
                   num_buckets=64, max_bucket_distance=200),
        # release 3 appended a second phase (a new warm-up and cosine at half the peak: the CTC and
        # voice losses were still falling at 4,000 steps); the first phase is release 2's, step for step
        phases=[dict(steps=p["wavlm_steps"][0], warmup_steps=max(p["wavlm_steps"][0] // 20, 1), lr=2e-3),
                dict(steps=p["wavlm_steps"][1], warmup_steps=max(p["wavlm_steps"][1] // 20, 1), lr=1e-3)],
        batch_size=p["wavlm_batch"], adam_b2=0.98,
        # objectives: CTC on characters (what is said) + utterance-level heads on the pooled states of
        # `aux_layer` (who speaks: the accent, and how many voices / none)
        aux_layer=p["wavlm_layers"] // 2, accent_weight=0.3, voices_weight=0.3,
        data=dict(
            accents=list(ACCENTS), male_variants=list(MALE_VARIANTS), female_variants=list(FEMALE_VARIANTS),
            kinds=dict(sentence=0.4, word_salad=0.15, shuffled=0.08, two_voices=0.1, one_voice_two=0.07,
                       overlap=0.1, noise=0.1),
            speed=(80, 260), pitch=(0, 99), max_word_gap=4, gain=(0.03, 1.0),  # the corpus: 120-190, 30-70, 0-2, 0.3-0.9
            noise_prob=0.3, snr_db=(5.0, 35.0), overlap_db=(4.0, 12.0),
            max_seconds=5.0, length_edges_seconds=(2.0, 3.0, 4.0, 5.0) if profile == "full" else (5.0,),
            block_size=4 * p["wavlm_batch"],  # clips made together, sorted by length into batches
            # the first blocks (narrow_blocks x 4 batches) hear corpus-like speech only; then the broad mix
            narrow_blocks=p["narrow_steps"] // 4,
            narrow=dict(accents=["en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029"],
                        male_variants=[f"m{i}" for i in range(1, 8)], female_variants=[f"f{i}" for i in range(1, 6)],
                        speed=(120, 190), pitch=(30, 70), max_word_gap=2, gain=(0.3, 0.9), noise_prob=0.0,
                        kinds=dict(sentence=0.8, word_salad=0.2)),
        ),
    )
    w = p["t5_width"]
    config.t5 = dict(
        model=dict(d_model=w, d_kv=w // 4, d_ff=w * 8 // 3, num_layers=p["t5_layers"],
                   num_decoder_layers=p["t5_layers"], num_heads=4, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False, relative_attention_num_buckets=32, relative_attention_max_distance=64,
                   dropout_rate=0.0),
        # lr 2e-3 with Adam's b2 0.999 made the loss climb from 0.1 to ~2 late in the copy phase (first
        # release, docs/demo_experiments.md): half the peak and b2 0.95, as LLM pretraining runs use
        batch_size=p["t5_batch"], lr=1e-3, adam_b2=0.95, max_input_tokens=192, max_target_tokens=48,
        # phases over one optimizer. Release 2 copied templates from the start and memorised them
        # (loss on random word strings 2.99 at the end, KWS 46%): now it first copies short random
        # word strings only (no template to recall, so it must learn to read its input; in a trial on
        # random strings alone, 2-6 words reached loss 1.62 at step 400 and 0.55 at 800, 2-12 words
        # 2.27 at 400), then all copy kinds, then the task mix with random strings kept in
        phases=[
            dict(steps=p["t5_steps"][0], warmup_steps=max(p["t5_steps"][0] // 12, 1), salad_words=(2, 6),
                 tasks=dict(copy_random=1.0)),
            dict(steps=p["t5_steps"][1], warmup_steps=max(p["t5_steps"][1] // 20, 1), salad_words=(2, 12),
                 tasks=dict(copy=0.25, copy_random=0.35, copy_shuffled=0.2, copy_stretched=0.2)),
            dict(steps=p["t5_steps"][2], warmup_steps=max(p["t5_steps"][2] // 20, 1), salad_words=(2, 12),
                 tasks=dict(copy=0.08, copy_random=0.15, copy_shuffled=0.07, copy_stretched=0.08, ic=0.12,
                            sf=0.12, kws=0.1, kws_random=0.1, kwe=0.08, open=0.04, joint=0.06)),
        ],
    )
    # the decoder-only LM beside the T5 (the demo's `layout='decoder'`): Llama-style (RoPE, GQA,
    # SwiGLU, tied embeddings as Llama 3.2 1B/3B), its own BPE tokenizer with a chat template, the
    # same text-task phases as the T5 with the answer after a chat prompt that holds the input text
    # where the audio goes; loss on the answer tokens only, as in SpeechVerse training
    w = p["lm_width"]
    config.lm = dict(
        model=dict(model_type="llama", hidden_size=w, intermediate_size=w * 8 // 3, num_hidden_layers=p["lm_layers"],
                   num_attention_heads=4, num_key_value_heads=2, head_dim=w // 4, rms_norm_eps=1e-5,
                   hidden_act="silu", tie_word_embeddings=True, max_position_embeddings=1024,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        tokenizer=dict(vocab_size=p["vocab"], chat_template=True),
        batch_size=p["t5_batch"], lr=1e-3, adam_b2=0.95, max_input_tokens=192, max_target_tokens=48,
        phases=[dict(ph, steps=steps, warmup_steps=max(steps // (12 if i == 0 else 20), 1))
                for i, (ph, steps) in enumerate(zip(config.t5.phases, p["lm_steps"]))] + [
            # release 5 appended a fourth phase (its own warm-up, half the peak). Release 4 never wrote
            # the accent or speech / non-speech labels: their pieces' rows of the tied embedding sat
            # at cosine 0.998 with each other and ~380 other unwritten pieces, and the decoder-only
            # demo's AC answered one accent for 52 of 56 clips. The answer words are copied now
            # (`copy_labels`); keyword spotting gets more and shorter word strings
            dict(steps=p["lm_steps"][3], warmup_steps=max(p["lm_steps"][3] // 20, 1), lr=5e-4, salad_words=(1, 8),
                 tasks=dict(copy=0.08, copy_random=0.12, copy_shuffled=0.07, copy_stretched=0.08, copy_labels=0.15,
                            ic=0.1, sf=0.1, kws=0.1, kws_random=0.15, kwe=0.08, open=0.04, joint=0.06)),
            *_kws_phases(p["lm_steps"][4:], dict(copy=0.08, copy_random=0.12, copy_shuffled=0.07, copy_stretched=0.08,
                                                 copy_labels=0.15, ic=0.1, sf=0.1, kwe=0.08, open=0.04, joint=0.06))],
    )
    # measured on held-out dev data at the end and written into the manifest; below a gate the
    # recipe fails (the quick profile's tiny backbones only report them)
    config.gates = dict(
        enforce=profile == "full",
        eval_clips=p["eval_clips"], probe_train_clips=p["probe_train"], text_rows=p["text_rows"],
        thresholds=dict(
            encoder_dev_cer=("<=", 3.0), probe_accent=(">=", 95.0), probe_voices=(">=", 95.0),
            probe_speech=(">=", 99.0), text_copy_wer=("<=", 2.0), text_ic_accuracy=(">=", 98.0),
            text_sf_slu_f1=(">=", 95.0), text_kws_accuracy=(">=", 98.0), text_kwe_f1=(">=", 95.0),
            lm_copy_wer=("<=", 2.0), lm_ic_accuracy=(">=", 98.0), lm_sf_slu_f1=(">=", 95.0),
            lm_kws_accuracy=(">=", 98.0), lm_kwe_f1=(">=", 95.0),
            # copying strings that hold the demo's answer words: an LLM that cannot write a label
            # cannot answer with it
            text_label_copy_wer=("<=", 2.0), lm_label_copy_wer=("<=", 2.0)),
    )
    return config
