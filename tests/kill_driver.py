"""`python tests/kill_driver.py <vljax.train flags>`: the training command, except that with
VLJAX_TEST_HOLD_SAVE=K the checkpoint of step K is written but never committed (its temporary
directory is complete, the rename that publishes it waits for an hour). The process prints
"HOLDING SAVE K" then, so a test can SIGKILL it in the middle of that save."""

import asyncio
import os

from orbax.checkpoint._src.path import atomicity

_HOLD = os.environ.get("VLJAX_TEST_HOLD_SAVE")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _held_finalize(self, *args, **kwargs):
    if _HOLD and self.get_final().name == _HOLD:
        print(f"HOLDING SAVE {_HOLD}", flush=True)
        await asyncio.sleep(3600)
    return await _finalize(self, *args, **kwargs)


atomicity.AtomicRenameTemporaryPath.finalize = _held_finalize

if __name__ == "__main__":
    from absl import app

    from vljax import cli, train

    app.run(train.main, flags_parser=cli.parse_flags)
