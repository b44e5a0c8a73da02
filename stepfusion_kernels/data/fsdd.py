"""Free Spoken Digit Dataset (FSDD): `recordings/{digit}_{speaker}_{index}.wav`, 8 kHz 16-bit mono PCM,
read with Python's `wave` module; log-mel features computed with torch (an STFT and a triangular mel
filterbank written here: no torchaudio)."""

import math
import os
import re
import wave

import numpy as np
import torch

RATE = 8000
_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def parse_name(filename):
    """'{digit}_{speaker}_{index}.wav' -> (digit, speaker, index); any other name is a ValueError."""
    match = _NAME.match(os.path.basename(filename))
    if match is None:
        raise ValueError(f"{filename}: an FSDD recording is named '{{digit}}_{{speaker}}_{{index}}.wav'")
    return int(match.group(1)), match.group(2), int(match.group(3))


def read_wav(path):
    """(samples float32 in [-1, 1), sample rate) of a 16-bit mono PCM wav file."""
    with wave.open(path, "rb") as handle:
        channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
        if channels != 1 or width != 2:
            raise ValueError(f"{path}: expected 16-bit mono PCM, got {channels} channels of {8 * width} bits")
        frames = handle.readframes(handle.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate


def read_fsdd(directory):
    """Every recording under `directory` (the `recordings` folder or its parent), sorted by (speaker, digit,
    index): (signals: list of float32 arrays, digits int64 (n,), speakers: list of str, indices int64 (n,))."""
    if os.path.isdir(os.path.join(directory, "recordings")):
        directory = os.path.join(directory, "recordings")
    names = [name for name in os.listdir(directory) if name.endswith(".wav")]
    if not names:
        raise FileNotFoundError(f"{directory}: no FSDD .wav recordings")
    entries = sorted((parse_name(name)[1], parse_name(name)[0], parse_name(name)[2], name) for name in names)
    signals = []
    for _, _, _, name in entries:
        signal, rate = read_wav(os.path.join(directory, name))
        if rate != RATE:
            raise ValueError(f"{name}: FSDD recordings are {RATE} Hz, got {rate}")
        signals.append(signal)
    digits = np.array([digit for _, digit, _, _ in entries], dtype=np.int64)
    indices = np.array([index for _, _, index, _ in entries], dtype=np.int64)
    return signals, digits, [speaker for speaker, _, _, _ in entries], indices


def fix_length(signal, samples):
    """The centred `samples` samples of `signal`, zero-padded evenly on both sides when it is shorter."""
    signal = torch.as_tensor(signal)
    excess = signal.shape[-1] - samples
    if excess >= 0:
        return signal[..., excess // 2: excess // 2 + samples]
    return torch.nn.functional.pad(signal, (-excess // 2, -excess - (-excess // 2)))


def mel_filterbank(n_mels, n_fft, rate, f_min=0.0, f_max=None):
    """(n_mels, n_fft // 2 + 1) triangular filters spaced evenly on the HTK mel scale
    mel(f) = 2595 log10(1 + f / 700), each peaking at 1 on its centre frequency."""
    f_max = rate / 2 if f_max is None else f_max

    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    edges_mel = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(signals, rate=RATE, n_fft=512, hop=256, n_mels=40, eps=1e-6):
    """log(mel power + eps) of signals (..., samples) -> (..., frames, n_mels), frames = 1 + samples // hop
    (centred Hann-windowed STFT)."""
    signals = torch.as_tensor(signals, dtype=torch.float32)
    lead = signals.shape[:-1]
    spectrum = torch.stft(signals.reshape(-1, signals.shape[-1]), n_fft, hop, window=torch.hann_window(n_fft),
                          center=True, return_complex=True)
    power = spectrum.abs() ** 2                                        # (n, bins, frames)
    mel = torch.einsum("mf,nft->ntm", mel_filterbank(n_mels, n_fft, rate), power)
    return torch.log(mel + eps).reshape(*lead, mel.shape[1], n_mels)
