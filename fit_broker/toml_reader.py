"""
Reading TOML settings files: every problem is one L{ConfigError} line naming
the file, the key and what was expected.

The cluster file, the syslog adapter's settings and the sink's settings all
read their tables through L{TableReader}, so they check types and report
mistakes the same way.
"""

import os
import tomllib

import attrs

from fit_broker.errors import ConfigError


def read_toml(path, what):
    """
    Return the parsed TOML file at C{path}, C{what} saying in errors what
    the file should be.

    @raise ConfigError: naming the file and the problem.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected {what}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def resolve_path(folder, path):
    """
    Return C{path} as written in a settings file: absolute as is, relative
    to the file's C{folder} otherwise.
    """
    return path if os.path.isabs(path) else os.path.join(folder, path)


class TableReader:
    """
    Typed access to a TOML table that names the file and key on any error.

    @ivar path: the file, for messages.
    @ivar table: the parsed table.
    @ivar where: its dotted location in the file (C{""} for the top level).
    """

    def __init__(self, path, table, where=""):
        self.path = path
        self.table = table
        self.where = where

    def fail(self, key, expected):
        """
        @raise ConfigError: C{path: [where.key]: expected ...}.
        """
        location = f"{self.where}.{key}" if self.where else key
        raise ConfigError(f"{self.path}: [{location}]: expected {expected}")

    def get(self, key, kind, expected, default=attrs.NOTHING):
        """
        Return the value of C{key}, of type C{kind} (an integer is taken
        for a float; a boolean is never a number), or C{default} when it is
        missing; without a default a missing key is an error.
        """
        if key not in self.table:
            if default is attrs.NOTHING:
                self.fail(key, f"{expected} (the key is missing)")
            return default
        value = self.table[key]
        if kind is float and type(value) is int:
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            self.fail(key, f"{expected}, found {value!r}")
        return value

    def number(self, key, kind, default, low, high=None, low_open=False):
        """
        Return the number at C{key} from C{low} (or above it, with
        C{low_open}) up to C{high}, or C{default} when it is missing.
        """
        value = self.get(key, kind, "a number", default)
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            bound = f"above {low}" if low_open else f"from {low}"
            upper = f" to {high}" if high is not None else " or more"
            self.fail(key, f"a number {bound}{upper}, found {value!r}")
        return value

    def sub(self, key, index=None):
        """
        Return a reader of the table at C{key} (an empty one when missing),
        or of item C{index} of the array of tables at C{key}.
        """
        where = f"{self.where}.{key}" if self.where else key
        if index is not None:
            where = f"{where}[{index}]"
            table = self.table[key][index]
        else:
            table = self.table.get(key, {})
        if not isinstance(table, dict):
            self.fail(key if index is None else f"{key}[{index}]", f"a table, found {table!r}")
        return TableReader(self.path, table, where)

    def unknown_keys(self, allowed):
        """
        Fail on the first key (in sorted order) that is not in C{allowed}.
        """
        extra = sorted(set(self.table) - set(allowed))
        if extra:
            self.fail(extra[0], f"one of the keys {', '.join(sorted(allowed))}")
