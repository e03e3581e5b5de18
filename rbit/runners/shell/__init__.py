"""The ``shell!`` runner: one command line run per job, without a shell.

A runner section such as::

    [runner:cnx_any_latex_pdf]
    runner = shell!/usr/local/bin/build-pdf --job %ID --out {outdir}/%ID.pdf %BODY
    timeout = 3600
    outdir = /srv/pdf
    kill_grace = 10

is split into arguments once, when the runner loads, the way a POSIX shell splits
words (:func:`shlex.split`). For each job the placeholders are then replaced *inside*
the already split arguments by plain string substitution, in a single pass, and the
argument list goes to :class:`subprocess.Popen` without a shell. A job id such as
``x; rm -rf ~ $(reboot)`` therefore arrives as one literal argument, and text put in by
a substitution is never scanned again.

Placeholders:

* ``%ID`` -- the job id (:attr:`rbit.message.Message.job_id`);
* ``%QUEUE`` -- the queue the job was consumed from;
* ``%BODY`` -- path of a private file (mode 0600, in a directory of the runner's own,
  mode 0700, under ``/dev/shm`` unless ``TMPDIR`` is set) holding the body, removed
  once the command and everything it started have ended;
* ``%ATTEMPT`` -- which try of the job this is, counting from 1;
* ``%%`` -- a literal ``%``;
* ``{key}`` -- the value of ``key`` in the runner's section. An unknown key is an error
  when the runner loads. ``${NAME}`` is left alone, since it is the syntax of a
  ``sh -c`` script.

Never put placeholders inside the script of a ``sh -c '...'`` argument: there the
substituted text *would* be read as shell syntax. A script reads the job from its
environment instead (``sh -c 'make -C /src JOB="$RBIT_JOB_ID"'``).

``%ID`` is the job id after the boundary's rule made it safe as a path component and an
argument (:mod:`rbit.message`); ``{outdir}/%ID.pdf`` stays in ``outdir``.

The command gets the body on stdin, runs in a process group (and session) of its own,
and finds in its environment what the section's ``env_keep`` keeps of the worker's
environment when the runner was loaded, never a variable the configuration read as a
secret, and what ``setenv`` sets (:mod:`rbit.runners.environment`), plus:

* ``RBIT_JOB_ID``, ``RBIT_QUEUE``, ``RBIT_BODY_FILE``, ``RBIT_ATTEMPT``;
* ``RBIT_STATUS_FD`` -- a file descriptor, open for writing, for progress reports.
  Each line written there, ``Status[ message]``, is passed on at once as
  ``set_status(Status, message)``; the status is one of PyBit's (``Waiting``,
  ``Blocked``, ``Building``, ``Done``, ``Failed``, ``Cancelled``, ``Uploaded``, any
  case). Lines naming another status are logged and ignored. From bash::

      echo "Building step 2" >&$RBIT_STATUS_FD

  The number is usually 3, but not always (with a working directory set, for one), and
  dash and other POSIX shells only accept single-digit descriptors in ``>&N``, so
  portable scripts write ``echo "Building step 2" >/dev/fd/$RBIT_STATUS_FD`` instead.

Apart from stdin, stdout, stderr and ``RBIT_STATUS_FD``, the command inherits no file
descriptor of the worker.

How the command ends decides the job's :class:`~rbit.outcome.Outcome`:

* exit status 0: done;
* exit status 75 (``EX_TEMPFAIL``): blocked, try later, with the tail of stderr;
* any other exit status: failed, ``exit status N: <tail of stderr>``;
* killed by a signal: failed, ``killed by signal SIGNAME``;
* the program cannot be started (missing, not executable): failed,
  ``cannot run <program>: <reason>``; the retry policy decides what happens next.

Only the last 4 KiB of stderr are kept. stdout goes to ``/dev/null``, except when the
module's logger is enabled for DEBUG: then its last 4 KiB are logged at DEBUG; and for
a broadcast copy (:mod:`rbit.broadcast`), whose caller gets the first 64 KiB of it
(:data:`~rbit.runners.shell.readers.OUTPUT_BYTES`; the rest is read and dropped, and
the answer says it was cut).

``timeout = SECONDS`` in the section bounds a run. On expiry the whole process group
gets SIGTERM; whatever is left of it ``kill_grace`` seconds later (default 5) gets
SIGKILL, and the job has failed with ``timed out after N s``. When the command exits
by itself, processes it left running in its group (background jobs, daemons it
started) are killed with SIGKILL, so that nothing outlives its job. A process that
moved to a session of its own escapes this, like any daemon would.

:meth:`ShellRunner.cancel` (the worker's answer to a second shutdown signal) stops the
process groups of all running jobs the same way; their runs end as blocked, so the jobs
are tried again later, and the runner starts no further commands.

No thread waits for a command: each job is a small state machine
(:class:`rbit.supervisor.Supervisor`, the same that watches ``python!`` runner
children) moved along by an event loop that watches the command's exit (a pidfd), its
pipes and its deadlines. In the worker that loop is the AMQP connection's own
(:meth:`ShellRunner.start_job`), so a job is started, watched and acked on one thread;
:meth:`ShellRunner.run` runs one job with a private ``poll`` loop. In the worker a job
is acked first and tidied up after: its fds are closed and its body file removed
while the next command starts up, or 20 ms after it ended when no other job starts.

The package's modules: :mod:`~rbit.runners.shell.template` (splitting and filling in
the command), :mod:`~rbit.runners.shell.spawn` (starting it, its pipes and
environment), :mod:`~rbit.runners.shell.bodies` (body files and what is made ahead),
:mod:`~rbit.runners.shell.readers` (stderr tail, status lines),
:mod:`~rbit.runners.shell.job` (one running command and its outcome) and
:mod:`~rbit.runners.shell.runner` (:class:`ShellRunner`).
"""

from rbit.runners.shell.runner import ShellRunner

__all__ = ["ShellRunner"]
