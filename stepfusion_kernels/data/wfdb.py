"""A small WFDB reader for the MIT-BIH Arrhythmia Database: record headers (.hea), signal format 212,
MIT-format annotation files (.atr) and ADC-to-physical conversion; beats cut around the reference
R-peak annotations and labelled with the AAMI classes."""

import dataclasses
import os
import re

import numpy as np

# MIT annotation codes (WFDB's ecgcodes.h) and their mnemonics.
ANNOTATION_SYMBOLS = {
    1: "N", 2: "L", 3: "R", 4: "a", 5: "V", 6: "F", 7: "J", 8: "A", 9: "S", 10: "E", 11: "j", 12: "/",
    13: "Q", 14: "~", 16: "|", 18: "s", 19: "T", 20: "*", 21: "D", 22: '"', 23: "=", 24: "p", 25: "B",
    26: "^", 27: "t", 28: "+", 29: "u", 30: "?", 31: "!", 32: "[", 33: "]", 34: "e", 35: "n", 36: "@",
    37: "x", 38: "f", 39: "(", 40: ")", 41: "r",
}
SKIP, NUM, SUB, CHN, AUX = 59, 60, 61, 62, 63

# AAMI EC57 beat classes from the annotation mnemonics.
AAMI_CLASSES = ("N", "S", "V", "F", "Q")
AAMI_OF_SYMBOL = {
    **dict.fromkeys("NLRej", "N"), **dict.fromkeys("AaJS", "S"), **dict.fromkeys("VE", "V"), "F": "F",
    **dict.fromkeys("/fQ", "Q"),
}

# The inter-patient split of de Chazal et al. (2004); records with paced beats are excluded.
DS1 = ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201", "203",
       "205", "207", "208", "209", "215", "220", "223", "230")
DS2 = ("100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212", "213", "214",
       "219", "221", "222", "228", "231", "232", "233", "234")


@dataclasses.dataclass
class SignalSpec:
    file_name: str
    fmt: int
    gain: float
    baseline: int
    units: str
    adc_resolution: int
    adc_zero: int
    initial_value: int
    checksum: int
    description: str


@dataclasses.dataclass
class Header:
    record: str
    num_signals: int
    frequency: float
    num_samples: int
    signals: list


def read_header(path):
    """Parses a .hea file: the record line, then one line per signal; '#' comment lines and blank lines
    may appear anywhere."""
    with open(path) as handle:
        lines = [line.strip() for line in handle]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no record line")
    record_fields = lines[0].split()
    record, num_signals = record_fields[0], int(record_fields[1])
    frequency = float(record_fields[2].split("/")[0]) if len(record_fields) > 2 else 250.0
    num_samples = int(record_fields[3]) if len(record_fields) > 3 else 0
    if len(lines) < 1 + num_signals:
        raise ValueError(f"{path}: {num_signals} signals declared, {len(lines) - 1} signal lines found")
    signals = [_parse_signal_line(line, path) for line in lines[1:1 + num_signals]]
    return Header(record, num_signals, frequency, num_samples, signals)


def _parse_signal_line(line, path):
    fields = line.split(maxsplit=8)
    if len(fields) < 2:
        raise ValueError(f"{path}: signal line too short: {line!r}")
    fmt = int(re.match(r"\d+", fields[1]).group())
    gain_field = fields[2] if len(fields) > 2 else "200"
    match = re.match(r"([-+\d.eE]+)(?:\((-?\d+)\))?(?:/(\S+))?", gain_field)
    gain = float(match.group(1)) or 200.0  # a gain of 0 means "uncalibrated": WFDB uses 200
    adc_resolution = int(fields[3]) if len(fields) > 3 else 12
    adc_zero = int(fields[4]) if len(fields) > 4 else 0
    baseline = int(match.group(2)) if match.group(2) is not None else adc_zero
    return SignalSpec(file_name=fields[0], fmt=fmt, gain=gain, baseline=baseline, units=match.group(3) or "mV",
                      adc_resolution=adc_resolution, adc_zero=adc_zero,
                      initial_value=int(fields[5]) if len(fields) > 5 else adc_zero,
                      checksum=int(fields[6]) if len(fields) > 6 else 0,
                      description=fields[8] if len(fields) > 8 else "")


def decode_format_212(raw, num_signals):
    """Format 212: pairs of 12-bit two's-complement samples packed in 3 bytes, frames interleaved.
    Returns int16 digital values of shape (samples, signals)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    data = data[: len(data) // 3 * 3].reshape(-1, 3).astype(np.int16)
    first = data[:, 0] | ((data[:, 1] & 0x0F) << 8)
    second = data[:, 2] | ((data[:, 1] & 0xF0) << 4)
    values = np.stack([first, second], axis=1).reshape(-1)
    values = np.where(values >= 2048, values - 4096, values).astype(np.int16)
    frames = len(values) // num_signals
    return values[: frames * num_signals].reshape(frames, num_signals)


def read_signals(header_path, physical=True):
    """The record's signals, (samples, signals): physical units (float32) or digital values (int16)."""
    header = read_header(header_path)
    formats = {s.fmt for s in header.signals}
    files = {s.file_name for s in header.signals}
    if formats != {212} or len(files) != 1:
        raise ValueError(f"{header_path}: only one format-212 signal file per record is supported, got "
                         f"formats {sorted(formats)} in {len(files)} files")
    signal_path = os.path.join(os.path.dirname(header_path), files.pop())
    with open(signal_path, "rb") as handle:
        digital = decode_format_212(handle.read(), header.num_signals)
    if header.num_samples:
        if len(digital) < header.num_samples:
            raise ValueError(f"{signal_path}: holds {len(digital)} samples per signal, the header declares "
                             f"{header.num_samples} (truncated file?)")
        digital = digital[: header.num_samples]
    if not physical:
        return digital
    baseline = np.array([s.baseline for s in header.signals], dtype=np.float32)
    gain = np.array([s.gain for s in header.signals], dtype=np.float32)
    return (digital.astype(np.float32) - baseline) / gain


def signal_checksum(digital_column):
    """WFDB's 16-bit checksum of one signal (the header's checksum field)."""
    total = int(digital_column.astype(np.int64).sum()) & 0xFFFF
    return total - 0x10000 if total >= 0x8000 else total


@dataclasses.dataclass
class Annotations:
    samples: np.ndarray  # int64, sample index of each annotation
    symbols: list        # mnemonic of each annotation ("N", "V", "+", ...)
    subtypes: np.ndarray
    channels: np.ndarray
    nums: np.ndarray
    aux: list            # bytes or None


def read_annotations(path):
    """An MIT-format annotation file: 16-bit little-endian words, code in the top 6 bits and the time
    increment in the low 10; SKIP carries a 32-bit increment, NUM/SUB/CHN set fields of the current
    annotation, AUX is followed by that many bytes (padded to even)."""
    with open(path, "rb") as handle:
        data = handle.read()
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    samples, symbols, subtypes, channels, nums, aux = [], [], [], [], [], []
    time, num, channel, index = 0, 0, 0, 0
    while index < len(words):
        word = int(words[index])
        code, value = word >> 10, word & 0x3FF
        index += 1
        if code == 0 and value == 0:
            break
        if code == SKIP:
            high, low = int(words[index]), int(words[index + 1])
            skip = (high << 16) | low
            time += skip - (1 << 32) if skip >= 1 << 31 else skip
            index += 2
        elif code in (NUM, SUB, CHN, AUX):
            # Modifiers of the annotation just read (one before any annotation is malformed).
            if not samples:
                raise ValueError(f"{path}: a {code} modifier precedes the first annotation")
            if code == NUM:
                num = value - 1024 if value >= 512 else value
                nums[-1] = num
            elif code == SUB:
                subtypes[-1] = value - 1024 if value >= 512 else value
            elif code == CHN:
                channel = value
                channels[-1] = channel
            else:
                aux[-1] = data[index * 2: index * 2 + value]
                index += (value + 1) // 2
        else:
            time += value
            samples.append(time)
            symbols.append(ANNOTATION_SYMBOLS.get(code, f"code{code}"))
            # num and chan persist from the previous annotation until changed (WFDB's convention).
            subtypes.append(0)
            channels.append(channel)
            nums.append(num)
            aux.append(None)
    return Annotations(np.array(samples, dtype=np.int64), symbols, np.array(subtypes, dtype=np.int64),
                       np.array(channels, dtype=np.int64), np.array(nums, dtype=np.int64), aux)


def aami_beats(signals, annotations, before, after):
    """Beats of width before + after around every annotated R peak whose symbol has an AAMI class and
    whose window fits the record: (beats float32 (n, before + after, signals), labels int64 (n,) indexing
    AAMI_CLASSES)."""
    windows, labels = [], []
    for sample, symbol in zip(annotations.samples, annotations.symbols):
        aami = AAMI_OF_SYMBOL.get(symbol)
        if aami is None or sample - before < 0 or sample + after > len(signals):
            continue
        windows.append(signals[sample - before: sample + after])
        labels.append(AAMI_CLASSES.index(aami))
    if not windows:
        return np.zeros((0, before + after, signals.shape[1]), np.float32), np.zeros(0, np.int64)
    return np.stack(windows).astype(np.float32), np.array(labels, dtype=np.int64)


def list_records(directory):
    """Record names with a header, a signal file and an .atr annotation file in `directory`."""
    names = []
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".hea"):
            record = entry[:-4]
            if os.path.exists(os.path.join(directory, record + ".atr")):
                names.append(record)
    return names
