"""Reading audio as the pipeline needs it: a window of a file, mono, at 44.1 kHz, checked.

Everything that can be wrong with a file raises ``AudioError`` with a short code (the runner's
summary groups failures by it) and a reason a person can act on:

=================  ==========================================================================
code               meaning
=================  ==========================================================================
missing_file       the path does not exist
empty_file         the file has zero bytes
not_audio          libsndfile does not recognise the format
truncated          the file ends before the audio its header declares (or decoding loses sync)
empty_audio        the file holds no samples
bad_sample_rate    the sample rate is below ``min_sample_rate``
too_many_channels  more channels than ``max_channels`` (a multitrack file, not a mix)
non_finite         NaN or infinite samples
silent             the window's peak is below ``silence_dbfs``
too_short          the window is shorter than ``min_duration_s``
=================  ==========================================================================
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.files import atomic_write
from pipeline.runner import ItemError

TARGET_SAMPLE_RATE = 44_100


class AudioError(ItemError):
    """A file or window that cannot be used as audio; ``code`` says why (see the module table)."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class AudioChecks:
    """Limits applied when reading audio; the defaults suit 25 s music clips."""

    min_sample_rate: int = 4_000
    max_channels: int = 8
    silence_dbfs: float = -80.0
    min_duration_s: float = 1.0


def probe(path: str | os.PathLike, checks: AudioChecks = AudioChecks()) -> AudioInfo:
    """Open ``path`` and return what its header says, or raise AudioError."""
    path = str(path)
    if not os.path.exists(path):
        raise AudioError("missing_file", f"audio file not found: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError("empty_file", f"audio file is empty (0 bytes): {path}")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError("not_audio", f"not a readable audio file ({_sf_reason(exc)}): {path}") from None
    if info.samplerate < checks.min_sample_rate:
        raise AudioError(
            "bad_sample_rate",
            f"sample rate {info.samplerate} Hz is below {checks.min_sample_rate} Hz: {path}",
        )
    if info.channels > checks.max_channels:
        raise AudioError(
            "too_many_channels",
            f"{info.channels} channels (at most {checks.max_channels}); this looks like a "
            f"multitrack file, give a mix instead: {path}",
        )
    declared = _declared_wav_frames(path, info)
    if declared is not None and declared > info.frames:
        raise AudioError(
            "truncated",
            f"the header declares {declared} frames but the file holds {info.frames} "
            f"({info.frames / info.samplerate:.2f} s of {declared / info.samplerate:.2f} s): {path}",
        )
    if info.frames <= 0:
        raise AudioError("empty_audio", f"the file holds no samples: {path}")
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames), info.format)


def read_window(
    info: AudioInfo,
    start_s: float,
    end_s: float,
    *,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    checks: AudioChecks = AudioChecks(),
) -> np.ndarray:
    """Read ``[start_s, end_s)`` of the file as mono float32 at ``target_sample_rate``, checked."""
    start = int(round(start_s * info.sample_rate))
    want = int(round(end_s * info.sample_rate)) - start
    try:
        with sf.SoundFile(info.path) as fh:
            if start:
                fh.seek(start)
            data = fh.read(want, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError("truncated", f"decoding failed ({_sf_reason(exc)}): {info.path}") from None
    # Compressed formats only estimate their length in the header; a real shortfall means a cut file.
    if len(data) < 0.98 * want and start + len(data) < 0.98 * info.frames:
        raise AudioError(
            "truncated",
            f"decoding stopped at {(start + len(data)) / info.sample_rate:.2f} s of a declared "
            f"{info.duration_s:.2f} s: {info.path}",
        )
    if not np.isfinite(data).all():
        raise AudioError("non_finite", f"the audio holds NaN or infinite samples: {info.path}")
    mono = data.mean(axis=1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    duration = len(mono) / info.sample_rate
    if duration < checks.min_duration_s:
        raise AudioError(
            "too_short",
            f"{duration:.3f} s of audio in the window (at least {checks.min_duration_s} s needed): {info.path}",
        )
    peak = float(np.max(np.abs(mono))) if len(mono) else 0.0
    peak_dbfs = 20 * np.log10(peak) if peak > 0 else -np.inf
    if peak_dbfs < checks.silence_dbfs:
        raise AudioError(
            "silent",
            f"the window [{start_s:.2f}, {end_s:.2f}) s is silent (peak {peak_dbfs:.1f} dBFS, "
            f"threshold {checks.silence_dbfs} dBFS): {info.path}",
        )
    if info.sample_rate != target_sample_rate:
        import soxr

        mono = soxr.resample(mono, info.sample_rate, target_sample_rate, quality="HQ").astype(np.float32)
    return mono


def write_wav16(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono audio as 16-bit PCM wav, atomically; a peak above full scale is scaled down."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak > 0.999:  # float sources and resampling overshoot can exceed full scale
        audio = audio * (0.999 / peak)
    # Encoded in memory and written by Python: libsndfile reports a failed write (a full disk) as
    # "System error" without its errno, which would hide that no later write can succeed either.
    encoded = io.BytesIO()
    sf.write(encoded, audio, sample_rate, subtype="PCM_16", format="WAV")
    with atomic_write(path) as fh:
        fh.write(encoded.getbuffer())


def _sf_reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[-1].strip() if ": " in text else text.strip()


def _declared_wav_frames(path: str, info: sf._SoundFileInfo) -> int | None:
    """Frames a RIFF/WAVE header promises, when it says (libsndfile silently shortens cut files)."""
    if info.format not in ("WAV", "WAVEX"):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"fmt " and pos + 22 <= len(head):
            block_align = struct.unpack("<H", head[pos + 20 : pos + 22])[0]
        elif chunk_id == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):  # streamed wavs leave the size unset
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None
