#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (C) 2026 qubes-socksvc developers
"""The exec reference: the echo handler as a qrexec executable service, one process per call.

qrexec starts it with the call in ``QREXEC_*`` variables, the caller's stdin on
stdin and the caller's stdout on stdout: what users write today.
"""

import os
import sys

service = os.environ["QREXEC_SERVICE_FULL_NAME"]
source = os.environ["QREXEC_REMOTE_DOMAIN"]
sys.stdout.buffer.write(sys.stdin.buffer.read())
