"""The reference evaluator: cel-python's interpreter, behind the same plain-Python interface.

The compiler (policyplug.cel.compile) must agree with this on every value and on every
error-versus-value outcome; it also runs conditions the compiler does not cover.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

import celpy
import celpy.celtypes as ct
import lark
from celpy.evaluation import CELEvalError

from .errors import CelEvaluationError
from .functions import EXTRA_FUNCTIONS

# Created at import: celpy.Environment() raises the interpreter's recursion limit (to 2500) as a
# side effect, better done once, up front, than in the middle of a test or a request.
_environment = celpy.Environment()


def _env() -> celpy.Environment:
    return _environment


def to_celpy(value: Any) -> Any:
    """A plain Python value (activation, constants) -> cel-python value."""
    if isinstance(value, bool):
        return ct.BoolType(value)
    if isinstance(value, int):
        return ct.IntType(value)  # ValueError outside int64: the evaluation fails
    if isinstance(value, float):
        return ct.DoubleType(value)
    if isinstance(value, str):
        return ct.StringType(value)
    if value is None:
        return None
    if isinstance(value, Mapping):
        return ct.MapType({to_celpy(k): to_celpy(v) for k, v in value.items()})
    if isinstance(value, (list, tuple, frozenset)):
        return ct.ListType([to_celpy(v) for v in value])
    if isinstance(value, (bytes, bytearray)):
        return ct.BytesType(bytes(value))
    if isinstance(value, datetime.datetime):
        return ct.TimestampType(value)
    if isinstance(value, datetime.timedelta):
        return ct.DurationType(value)
    raise TypeError(f"no CEL type for {type(value).__name__}")


def to_plain(value: Any) -> Any:
    """A cel-python result -> plain Python (bool, int, float, str, bytes, list, dict, datetime, timedelta, None)."""
    if isinstance(value, CELEvalError):
        raise CelEvaluationError(_message(value))
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):  # BoolType is an int too
        return bool(value) if isinstance(value, ct.BoolType) else int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
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
    return value  # type() results and the like: handed over as they are


def _message(exc: BaseException) -> str:
    if isinstance(exc, CELEvalError) and exc.args:
        return str(exc.args[0])
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def interpret(tree: lark.Tree, constants: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], Any]:
    """fn(activation) -> plain value, evaluated by cel-python's interpreter.

    Raises CelEvaluationError for every failure, whether cel-python returned an error value,
    raised one, or let a Python exception escape."""
    # Built on first use: the compiler keeps a reference runner for every expression as its
    # fallback, and most are never called (building them all costs a large part of load time).
    prepared: list[Any] = []

    def evaluate(activation: Mapping[str, Any]) -> Any:
        if not prepared:
            prepared.append(_env().program(tree, functions=EXTRA_FUNCTIONS))
            prepared.append({name: to_celpy(tuple(entries)) for name, entries in constants.items()})
        runner, cel_constants = prepared
        try:
            context = dict(cel_constants)
            for name, value in activation.items():
                context[name] = to_celpy(value)
            return to_plain(runner.evaluate(context))
        except CelEvaluationError:
            raise
        except RecursionError as exc:
            raise CelEvaluationError("expression nests too deep") from exc
        except Exception as exc:  # CELEvalError raised, or a Python exception escaping cel-python
            raise CelEvaluationError(_message(exc)) from exc

    return evaluate
