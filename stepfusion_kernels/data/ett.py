"""ETT (Electricity Transformer Temperature) CSVs: date + 7 variables (ETTh1/ETTh2 hourly, ETTm1/ETTm2
every 15 minutes), with the standard long-horizon protocol of Informer/Autoformer."""

import csv
import dataclasses

import numpy as np

HOURS_PER_MONTH = 30 * 24
TRAIN_MONTHS, VALIDATION_MONTHS, TEST_MONTHS = 12, 4, 4


@dataclasses.dataclass
class EttTable:
    dates: np.ndarray  # datetime64[m], (T,)
    values: np.ndarray  # float32, (T, V)
    columns: list


def read_ett(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if not header or header[0] != "date":
            raise ValueError(f"{path}: expected an ETT CSV whose first column is 'date', got {header[:1]}")
        rows = [row for row in reader if row]
    dates = np.array([row[0] for row in rows], dtype="datetime64[m]")
    values = np.array([[float(v) for v in row[1:]] for row in rows], dtype=np.float32)
    return EttTable(dates, values, header[1:])


def steps_per_hour(dates):
    """1 for the hourly files, 4 for the 15-minute ones (read off the spacing of the first two rows)."""
    minutes = int((dates[1] - dates[0]) / np.timedelta64(1, "m"))
    if minutes not in (15, 60):
        raise ValueError(f"ETT rows must be 15 or 60 minutes apart, got {minutes}")
    return 60 // minutes


def split_bounds(lookback, per_hour=1):
    """[(start, end)] row ranges of train, validation and test: 12/4/4 months of 30 days, each later
    split starting `lookback` rows early so that its first window has a full history."""
    month = HOURS_PER_MONTH * per_hour
    ends = [TRAIN_MONTHS * month, (TRAIN_MONTHS + VALIDATION_MONTHS) * month,
            (TRAIN_MONTHS + VALIDATION_MONTHS + TEST_MONTHS) * month]
    starts = [0, ends[0] - lookback, ends[1] - lookback]
    return list(zip(starts, ends))


def calendar_features(dates):
    """(T, 4) in [-0.5, 0.5]: hour of day, day of week, day of month, day of year (Informer's 'timeF')."""
    days = dates.astype("datetime64[D]")
    hour = (dates - days).astype("timedelta64[h]").astype(np.int64)
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    month_start = days.astype("datetime64[M]").astype("datetime64[D]")
    day_of_month = (days - month_start).astype(np.int64)
    day_of_year = (days - days.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)
    return np.stack([hour / 23.0 - 0.5, weekday / 6.0 - 0.5, day_of_month / 30.0 - 0.5,
                     day_of_year / 365.0 - 0.5], axis=1).astype(np.float32)
