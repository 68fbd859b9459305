"""The functions and value types CEL compiled to Python by policyplug.cel.compile calls.

`exported` names what generated code may call: the compiler puts each into the generated
module's namespace with a leading underscore (`g_rel` as `_g_rel`), and nothing else.

Value representation
--------------------
Compiled code works on plain Python values: bool, int, float, str, bytes, list, dict, None,
datetime (CEL timestamp) and timedelta (CEL duration). cel-python, the reference, keeps a few
values that are *not* its CEL wrapper types (``"a" + "b"`` is a plain ``str`` without the
``contains`` method, ``1.0 + 2.0`` a plain ``float`` that compares equal to an int, ``true + true``
a plain ``int``...). To agree with it exactly, compiled code marks such values with the
subclasses below (``RawStr``...), and ``Uint`` marks CEL uint values. ``plain()`` strips the
marks from a result.

Errors
------
cel-python has three kinds of failure, and they behave differently:

* ``Err``: a CEL error *value* (cel-python's CELEvalError returned as a value). ``&&``, ``||``,
  the unchosen branch of ``?:``, ``has()`` and the ``exists``/``all`` macros absorb it.
* ``Raised``: a CELEvalError that cel-python *raises* (an error inside the body of ``map``,
  ``filter`` or ``exists_one``). Only ``exists``/``all`` bodies catch it.
* ``PyErr``: a plain Python exception escaping cel-python (a macro over a non-list). A ternary
  branch turns a TypeError into an error value; nothing else catches it.

All three derive from CelEvaluationError, so they leave compiled code as the engine expects.
``Defer`` is different: a helper raises it where cel-python's behaviour is too quirky to
replicate (iterating bytes, error values stored inside a map literal...); the compiled
expression then re-runs that one evaluation with the reference interpreter.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

import celpy.celtypes as ct
import re2
from celpy.evaluation import CELEvalError, base_functions, operator_in

from .errors import CelEvaluationError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


# ---------------------------------------------------------------- errors


class Err(CelEvaluationError):
    """A CEL error value (absorbed by &&, ||, ?:, has(), exists, all).

    `bad_repr` replicates a cel-python bug: the repr() of an error created at a node that its
    tree_dump() cannot print (e.g. `x < []`) raises IndexError, and `&&`/`||` format both operands
    into their "no matching overload" message, so that IndexError escapes. `settled` is set
    once bad_repr is known (errors that came out of cel-python as values)."""

    bad_repr = False
    settled = False


class Raised(CelEvaluationError):
    """An error cel-python raises instead of returning (inside map/filter/exists_one bodies)."""


class PyErr(CelEvaluationError):
    """A Python exception escaping cel-python's interpreter; `cls` is its class."""

    def __init__(self, message: str, cls: type[BaseException]):
        super().__init__(message)
        self.cls = cls


class Defer(Exception):  # noqa: N818 - a signal, not an error
    """Raised where only the reference interpreter knows the answer for this input."""


deferrals = 0  # how many evaluations were handed to the reference (tests read this)


def count_deferral() -> None:
    global deferrals
    deferrals += 1


def no_overload(what: str = "no such overload") -> Err:
    return Err(what)


# ---------------------------------------------------------------- value marks


class Uint(int):
    """A CEL uint."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{int(self)}u"


class RawInt(int):
    """A plain Python int inside cel-python (e.g. `true + true`)."""

    __slots__ = ()


class RawFloat(float):
    """A plain Python float inside cel-python (double +, -, *)."""

    __slots__ = ()


class RawStr(str):
    """A plain Python str inside cel-python (string concatenation, indexing, iteration)."""

    __slots__ = ()


class RawBytes(bytes):
    """Plain bytes inside cel-python (bytes concatenation)."""

    __slots__ = ()


class RawList(list):
    """A plain Python list inside cel-python (list concatenation)."""

    __slots__ = ()


class RawDuration(datetime.timedelta):
    """A plain timedelta inside cel-python (duration subtraction)."""

    __slots__ = ()


class ErrVal:
    """A CEL error stored as a value inside a map literal: cel-python evaluates `{"a": 1/0, "b": 1}.b`
    to 1 and only fails when the erroneous entry is read (or the map is the result)."""

    __slots__ = ("message", "bad_repr")

    def __init__(self, exc: BaseException, bad_repr: bool | None = None):
        self.message = str(exc)
        self.bad_repr = getattr(exc, "bad_repr", False) if bad_repr is None else bad_repr

    def error(self) -> Err:
        err = Err(self.message)
        err.bad_repr, err.settled = self.bad_repr, True
        return err


def cel_repr_fails(value: Any) -> bool:
    try:
        repr(value)
    except Exception:  # noqa: BLE001 - any failure is what we are detecting
        return True
    return False


_NONE = type(None)


def to_cel(value: Any) -> Any:
    """Compiled representation -> cel-python value. Raises Defer for what cannot be mapped."""
    t = type(value)
    if t is str:
        return ct.StringType(value)
    if t is bool:
        return ct.BoolType(value)
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return ct.IntType(value)
        raise Defer("int out of the int64 range")
    if t is float:
        return ct.DoubleType(value)
    if value is None:
        return None
    if t is dict:
        return ct.MapType({to_cel(k): to_cel(v) for k, v in value.items()})
    if t is list or t is tuple:
        return ct.ListType([to_cel(v) for v in value])
    if t is Uint:
        return ct.UintType(int(value))
    if t is RawInt:
        return int(value)
    if t is RawFloat:
        return float(value)
    if t is RawStr:
        return str(value)
    if t is RawBytes:
        return bytes(value)
    if t is RawList:
        return [to_cel(v) for v in value]
    if t is bytes:
        return ct.BytesType(value)
    if t is ct.TimestampType or t is ct.DurationType:
        return value
    if t is RawDuration:
        return datetime.timedelta(value.days, value.seconds, value.microseconds)
    if t is ErrVal:  # an error stored in a map: only cel-python knows how it prints, compares...
        raise Defer("error value inside a map")
    if isinstance(value, datetime.datetime):
        return ct.TimestampType(value)
    if isinstance(value, datetime.timedelta):
        try:
            return ct.DurationType(value)
        except ValueError:
            raise Defer("duration out of range") from None
    raise Defer(f"no CEL value for {t.__name__}")


def from_cel(value: Any) -> Any:
    """cel-python value -> compiled representation (keeps cel-python's plain values marked)."""
    t = type(value)
    if t is ct.BoolType:
        return bool(value)
    if t is ct.IntType:
        return int(value)
    if t is ct.StringType:
        return str(value)
    if value is None:
        return None
    if t is ct.UintType:
        return Uint(value)
    if t is ct.DoubleType:
        return float(value)
    if t is ct.ListType:
        return [from_cel(v) for v in value]
    if t is ct.MapType:
        return {from_cel(k): from_cel(v) for k, v in value.items()}
    if t is ct.BytesType:
        return bytes(value)
    if t is ct.TimestampType or t is ct.DurationType:
        return value
    if t is str:
        return RawStr(value)
    if t is int:
        return RawInt(value)
    if t is float:
        return RawFloat(value)
    if t is bytes:
        return RawBytes(value)
    if t is list:
        return RawList(from_cel(v) for v in value)
    if t is datetime.timedelta:
        return RawDuration(value.days, value.seconds, value.microseconds)
    if isinstance(value, CELEvalError):
        return ErrVal(value, cel_repr_fails(value))
    raise Defer(f"cannot represent {t.__name__}")  # error values inside maps, type objects...


def plain(value: Any) -> Any:
    """Compiled representation -> the plain Python value handed to the engine."""
    t = type(value)
    if t is bool or t is int or t is str or t is float or value is None or t is bytes:
        return value
    if t is list or t is RawList or t is tuple:
        return [plain(v) for v in value]
    if t is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    if t is Uint or t is RawInt:
        return int(value)
    if t is RawFloat:
        return float(value)
    if t is RawStr:
        return str(value)
    if t is RawBytes:
        return bytes(value)
    if isinstance(value, datetime.datetime):
        return datetime.datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            tzinfo=value.tzinfo,
        )
    if isinstance(value, datetime.timedelta):
        return datetime.timedelta(value.days, value.seconds, value.microseconds)
    if t is ErrVal:
        raise value.error()
    return value


# ---------------------------------------------------------------- functions shared with the reference

_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_UPPER = {c + 32: c for c in range(ord("A"), ord("Z") + 1)}


def cel_lower_ascii(text: Any) -> Any:
    """CEL strings extension lowerAscii() (cel-python 0.5 lacks it; both evaluators use this)."""
    return ct.StringType(text.translate(_LOWER))


def cel_upper_ascii(text: Any) -> Any:
    return ct.StringType(text.translate(_UPPER))


EXTRA_FUNCTIONS = {"lowerAscii": cel_lower_ascii, "upperAscii": cel_upper_ascii}
FUNCTIONS: dict[str, Any] = {**base_functions, **EXTRA_FUNCTIONS}


def lower_ascii(text: str) -> str:
    return text.translate(_LOWER)


def upper_ascii(text: str) -> str:
    return text.translate(_UPPER)


# ---------------------------------------------------------------- generic operations (exact via cel-python)
# Each mirrors one node of celpy.evaluation.Evaluator: same function, same caught exceptions.


def _result(value: Any) -> Any:
    if isinstance(value, CELEvalError):  # returned, not raised: it carries its own tree (or none)
        err = Err(str(value.args[0]) if value.args else "error")
        err.bad_repr, err.settled = cel_repr_fails(value), True
        raise err
    return from_cel(value)


def _call(fn: Any, args: tuple[Any, ...], caught: tuple[type[BaseException], ...]) -> Any:
    cel_args = [to_cel(a) for a in args]
    try:
        value = fn(*cel_args)
    except caught as exc:
        raise Err(f"{type(exc).__name__}: {exc}") from None
    except Defer:
        raise
    except Exception as exc:
        raise PyErr(f"{type(exc).__name__}: {exc}", type(exc)) from None
    return _result(value)


_REL_CAUGHT = (TypeError,)
_ADD_CAUGHT = (TypeError, ValueError, OverflowError)
_MUL_CAUGHT = (TypeError, ZeroDivisionError, ValueError, OverflowError)
_UNARY_CAUGHT = (TypeError, ValueError)
_INDEX_CAUGHT = (TypeError, KeyError, IndexError)
_CALL_CAUGHT = (ValueError, TypeError, AttributeError)


def g_rel(op: str, a: Any, b: Any) -> Any:
    ta, tb = type(a), type(b)
    if ta is tb and (ta is str or ta is int or ta is bool):  # common same-type cases, no wrapping needed
        if op == "_==_":
            return a == b
        if op == "_!=_":
            return a != b
    return _call(FUNCTIONS[op], (a, b), _REL_CAUGHT)


def g_in(item: Any, container: Any) -> Any:
    if type(item) is str:
        tc = type(container)
        if tc is dict or tc is list:
            if all(type(c) is str for c in container):  # no element can raise on comparison
                return item in container
    return _call(operator_in, (item, container), _REL_CAUGHT)


def g_add(op: str, a: Any, b: Any) -> Any:
    return _call(FUNCTIONS[op], (a, b), _ADD_CAUGHT)


def g_mul(op: str, a: Any, b: Any) -> Any:
    return _call(FUNCTIONS[op], (a, b), _MUL_CAUGHT)


def g_unary(op: str, a: Any) -> Any:
    return _call(FUNCTIONS[op], (a,), _UNARY_CAUGHT)


def g_index(container: Any, index: Any) -> Any:
    return _call(FUNCTIONS["_[_]"], (container, index), _INDEX_CAUGHT)


def g_call(name: str, *args: Any) -> Any:
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise Err(f"undeclared reference to '{name}'")
    return _call(fn, args, _CALL_CAUGHT)


def g_method(name: str, target: Any, *args: Any) -> Any:
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise Err(f"undeclared reference to '{name}'")
    return _call(fn, (target, *args), _CALL_CAUGHT)


def select(value: Any, name: str) -> Any:
    """`value.name` (cel-python member_dot: maps only)."""
    if type(value) is dict:
        try:
            found = value[name]
        except KeyError:
            raise Err(f"no such member in mapping: {name!r}") from None
        if type(found) is ErrVal:
            raise found.error()
        return found
    raise Err(f"{type(value).__name__} does not support field selection")


def mget(mapping: dict, key: Any) -> Any:
    try:
        found = mapping[key]
    except KeyError:
        raise Err(f"no such key: {key!r}") from None
    if type(found) is ErrVal:
        raise found.error()
    return found


def has_key(mapping: dict, key: str) -> bool:
    """has(m.key): present and not an error value."""
    found = mapping.get(key, ErrVal)
    return found is not ErrVal and type(found) is not ErrVal


def map_item_error(exc: PyErr) -> Err:
    """cel-python turns a TypeError/ValueError while building a map literal into an error value."""
    if issubclass(exc.cls, (TypeError, ValueError)):
        return Err(str(exc))
    raise exc


def lidx(seq: list, index: int) -> Any:
    try:
        return seq[index]
    except IndexError:
        raise Err("invalid_argument: index out of range") from None


def make_map(items: list[Any]) -> dict:
    """A map literal from evaluated [k1, v1, k2, v2, ...] (cel-python mapinits).

    Keys go through cel-python's own MapType for its duplicate and type checks; values stay as
    they are (an ErrVal among them is kept, as cel-python keeps the error value)."""
    seen = ct.MapType()
    out: dict = {}
    try:
        for i in range(0, len(items), 2):
            key = items[i]
            if type(key) is ErrVal:  # cel-python: the error object is unhashable
                raise TypeError("unhashable type: 'CELEvalError'")
            cel_key = to_cel(key)
            if cel_key in seen:
                raise ValueError(f"Duplicate key {cel_key!r}")
            seen[cel_key] = None
            out[key] = items[i + 1]
    except (ValueError, TypeError) as exc:
        raise Err(str(exc)) from None
    return out


def size(value: Any) -> int:
    if value is None:
        return 0
    return g_call("size", value)


# ---------------------------------------------------------------- logic (cel-python logical_and / logical_or)


def land(x: Any, y: Any, bad: bool = False) -> Any:
    """x && y on values or Err instances; returns a value or an Err instance."""
    bx, by = type(x) is bool, type(y) is bool
    if not bx and not by:
        return _no_logic_overload(x, y, "_&&_", bad)
    if not bx:
        return x if y else y
    if not by:
        return y if x else x
    return x and y


def lor(x: Any, y: Any, bad: bool = False) -> Any:
    bx, by = type(x) is bool, type(y) is bool
    if not bx and not by:
        return _no_logic_overload(x, y, "_||_", bad)
    if not bx:
        return y if y else x
    if not by:
        return x if x else y
    return x or y


def lnot(x: Any) -> bool:
    if type(x) is bool:
        return not x
    raise Err("no matching overload for !_")


def raise_if_err(value: Any) -> Any:
    if type(value) is Err:
        raise value
    return value


def ternary_err(bad: bool = False) -> Err:
    err = Err("no matching overload for _?_:_")
    if bad:
        mark_bad_repr(err)
    return err


# ---------------------------------------------------------------- macros


def macro_iter(target: Any) -> Any:
    """What cel-python's macros iterate over `target`."""
    t = type(target)
    if t is list or t is dict or t is RawList:
        return target
    if t is str or t is RawStr:
        return [RawStr(c) for c in target]
    if t is bytes or t is RawBytes:
        return [RawInt(b) for b in target]  # iterating bytes gives plain ints
    raise PyErr(f"'{t.__name__}' object is not iterable", TypeError)


def chars(text: str) -> list[RawStr]:
    return [RawStr(c) for c in text]


def raised(exc: Err) -> Raised:
    out = Raised(str(exc))
    out.bad_repr = exc.bad_repr  # type: ignore[attr-defined]
    return out


def as_err(exc: BaseException) -> Err:
    """exists/all catch errors raised by their body and keep them as values."""
    if type(exc) is Err:
        return exc
    out = Err(str(exc))
    out.bad_repr = getattr(exc, "bad_repr", False)
    out.settled = True
    return out


def mark_bad_repr(exc: Err) -> None:
    """An error created by a node cel-python cannot tree_dump (see Err)."""
    if not exc.settled:
        exc.bad_repr = True
        exc.settled = True


def _repr_fails(value: Any) -> bool:
    t = type(value)
    if t is Err or t is ErrVal:
        return value.bad_repr
    if t is dict:
        return any(_repr_fails(v) for v in value.values())
    if t is list or t is RawList:
        return any(_repr_fails(v) for v in value)
    return False


def _no_logic_overload(x: Any, y: Any, op: str, bad: bool) -> Err:
    if _repr_fails(x) or _repr_fails(y):  # the TypeError message formats repr() of both operands
        raise PyErr("IndexError: pop from empty list", IndexError)
    err = Err(f"no matching overload for {op}")
    if bad:
        mark_bad_repr(err)
    return err


def pyerr_to_err(exc: PyErr) -> Err:
    """A ternary branch turns a Python TypeError into an error value; anything else escapes."""
    if issubclass(exc.cls, TypeError):
        return Err(str(exc))
    raise exc


# ---------------------------------------------------------------- arithmetic (int64 / uint64)


def _ovf() -> Err:
    return Err("return error for overflow")


def iadd(a: int, b: int) -> int:
    r = a + b
    if INT64_MIN <= r <= INT64_MAX:
        return r
    raise _ovf()


def isub(a: int, b: int) -> int:
    r = a - b
    if INT64_MIN <= r <= INT64_MAX:
        return r
    raise _ovf()


def imul(a: int, b: int) -> int:
    r = a * b
    if INT64_MIN <= r <= INT64_MAX:
        return r
    raise _ovf()


def idiv(a: int, b: int) -> int:
    if b == 0:
        raise Err("modulus or divide by zero")
    q = abs(a) // abs(b)  # Go/CEL truncate toward zero
    r = -q if (a < 0) != (b < 0) else q
    if INT64_MIN <= r <= INT64_MAX:
        return r
    raise _ovf()


def imod(a: int, b: int) -> int:
    if b == 0:
        raise Err("modulus or divide by zero")
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def ineg(a: int) -> int:
    r = -a
    if r <= INT64_MAX:
        return r
    raise _ovf()


def _u(r: int) -> Uint:
    if 0 <= r <= UINT64_MAX:
        return Uint(r)
    raise _ovf()


def uadd(a: int, b: int) -> Uint:
    return _u(a + b)


def usub(a: int, b: int) -> Uint:
    return _u(a - b)


def umul(a: int, b: int) -> Uint:
    return _u(a * b)


def udiv(a: int, b: int) -> Uint:
    if b == 0:
        raise Err("modulus or divide by zero")
    return _u(a // b)


def umod(a: int, b: int) -> Uint:
    if b == 0:
        raise Err("modulus or divide by zero")
    return _u(a % b)


def sconcat(a: str, b: str) -> RawStr:
    return RawStr(a + b)


# ---------------------------------------------------------------- regular expressions (RE2, as cel-python)

_regex_cache: dict[str, Any] = {}
_regex_lock = threading.Lock()
_REGEX_CACHE_MAX = 1024
# RE2 writes a bad pattern's error to stderr itself (with an absl banner): the load reports it with
# its file and line instead, and the condition's error names it at run time
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_regex(pattern: str) -> Any:
    """re2 pattern object, or the re2.error it raised (cached: a bad pattern is not compiled again)."""
    found = _regex_cache.get(pattern)
    if found is None:
        try:
            found = re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as exc:
            found = exc
        with _regex_lock:
            if len(_regex_cache) >= _REGEX_CACHE_MAX:
                _regex_cache.clear()
            _regex_cache[pattern] = found
    return found


def regex_tester(regex: Any) -> Any:
    """A fast `regex.search(text) is not None` for str text.

    google-re2's Python search() decodes match offsets in Python (about 4 us); a yes/no test
    only needs RE2's Match on the UTF-8 text, which is what search() calls underneath."""
    try:
        match, anchor, null_span = regex._regexp.Match, re2._Anchor.UNANCHORED, re2._NULL_SPAN
    except AttributeError:  # another google-re2 layout: use the public API
        return lambda text: regex.search(text) is not None

    def test(text: str) -> bool:
        data = text.encode("utf-8")
        return match(anchor, data, 0, len(data))[0] != null_span

    return test


_tester_cache: dict[str, Any] = {}


def matches(text: Any, pattern: Any) -> bool:
    """text.matches(pattern) for any run-time pattern."""
    if isinstance(text, str) and isinstance(pattern, str):
        tester = _tester_cache.get(pattern)
        if tester is None:
            regex = compile_regex(pattern)
            if isinstance(regex, re2.error):
                raise Err("match error")
            tester = regex_tester(regex)
            with _regex_lock:
                if len(_tester_cache) >= _REGEX_CACHE_MAX:
                    _tester_cache.clear()
                _tester_cache[pattern] = tester
        return tester(text)
    return g_method("matches", text, pattern)


def bad_regex() -> Err:
    return Err("match error")


# ---------------------------------------------------------------- timestamps


class LocalTime:
    """Converts a timestamp to one time zone, remembering the last conversion.

    The engine hands every condition of one decision the same `time` object, so a policy that
    asks for getHours("Europe/Berlin") in many rules converts once per decision."""

    __slots__ = ("tz", "last")

    def __init__(self, tz: datetime.tzinfo | None):
        self.tz = tz  # None where cel-python's lookup finds no zone (astimezone then uses the host's)
        self.last: tuple[Any, Any] = (None, None)

    def __call__(self, t: datetime.datetime) -> datetime.datetime:
        last = self.last
        if last[0] is t:
            return last[1]
        local = t.astimezone(self.tz)
        self.last = (t, local)  # one tuple: a racing thread never sees a mismatched pair
        return local


_local_times: dict[Any, LocalTime] = {}


def local_time_for(name: str | None) -> LocalTime:
    """One shared converter per zone name, so every condition of a policy reuses the conversion."""
    found = _local_times.get(name)
    if found is None:
        found = _local_times.setdefault(name, LocalTime(timezone_for(name)))
    return found


def day_of_year(local: datetime.datetime) -> int:
    return local.timetuple().tm_yday - 1


def timezone_for(name: str | None) -> datetime.tzinfo | None:
    """cel-python's own time zone lookup (pendulum names, '+HH:MM' offsets, '' or None = UTC)."""
    return ct.TimestampType.tz_parse(ct.StringType(name) if name is not None else None)


def fail_err(message: str, bad: bool = False) -> Any:
    """Raise the CEL error value `message` (a failure the compiler found while compiling)."""
    err = Err(message)
    err.bad_repr, err.settled = bad, True
    raise err


def fail_raised(message: str, bad: bool = False) -> Any:
    """Raise `message` as an error cel-python raises rather than returns (see Raised)."""
    err = Raised(message)
    err.bad_repr = bad  # type: ignore[attr-defined]
    raise err


def fail_py(message: str, cls: type[BaseException]) -> Any:
    """Raise `message` as the Python exception `cls` would escape cel-python (see PyErr)."""
    raise PyErr(message, cls)


def bad_regex_for(text: Any) -> Any:
    """The error of `matches` with a pattern that does not compile."""
    raise bad_regex()


# What generated code may call (as `_NAME`): the compiler's only way into this module.
exported = (
    "Err",
    "Raised",
    "PyErr",
    "Defer",
    "ErrVal",
    "fail_err",
    "fail_raised",
    "fail_py",
    "bad_regex_for",
    "as_err",
    "mark_bad_repr",
    "raised",
    "pyerr_to_err",
    "ternary_err",
    "g_rel",
    "g_in",
    "g_add",
    "g_mul",
    "g_unary",
    "g_index",
    "g_call",
    "g_method",
    "select",
    "mget",
    "has_key",
    "map_item_error",
    "lidx",
    "make_map",
    "land",
    "lor",
    "lnot",
    "macro_iter",
    "chars",
    "matches",
    "iadd",
    "isub",
    "imul",
    "idiv",
    "imod",
    "ineg",
    "uadd",
    "usub",
    "umul",
    "udiv",
    "umod",
    "sconcat",
    "lower_ascii",
    "upper_ascii",
    "day_of_year",
    "plain",
)
