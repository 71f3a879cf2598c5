"""file:// image URLs inside ``serve --media-dir`` (serve/media.py through wire.read_image_url).

The folder is opened once and every component walked from its descriptor without following links, so
a file swapped for a symlink between a check and the read cannot send the server outside (issue 32).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from convllava_edge.serve import media as media_module
from convllava_edge.serve.media import MediaDir
from convllava_edge.serve.wire import ApiError, read_image_url

IMAGE = b"\x89PNG\r\n\x1a\n inside the media folder"
OUTSIDE = b"SECRET outside the media folder"
CAP = 1 << 20
# Direct calls against a writer flipping the file: the check-then-open by name answered 11-27 of 3,000 about
# the outside file here (and 1-3 were a 500: realpath's EINVAL when the link went mid-resolve); ~0.5 s.
SWAP_ROUNDS = 3000
SWAP_SECONDS = 20.0  # and at most this long, whatever the machine's speed
PAUSE, PAUSE_EVERY = 0.001, 10  # reads spread over the writer's flips, not bunched in one phase of it


@pytest.fixture
def folders(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside"
    (media / "sub" / "deeper").mkdir(parents=True)
    outside.mkdir()
    (media / "x.png").write_bytes(IMAGE)
    (media / "sub" / "deeper" / "y.png").write_bytes(IMAGE + b" (deeper)")
    (outside / "secret.png").write_bytes(OUTSIDE)
    return media, outside


def read(url: str, folder) -> bytes:
    return read_image_url(url, "messages[0].content[0]", CAP, MediaDir(folder))


def refused(url: str, folder, status: int = 400) -> str:
    """The message of the ApiError the URL gets, checked to be OpenAI's shape for a bad image URL."""
    with pytest.raises(ApiError) as caught:
        read(url, folder)
    e = caught.value
    assert e.status == status
    assert e.param == "messages[0].content[0].image_url"
    assert e.code == ("invalid_image_url" if status == 400 else "image_too_large")
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    return e.message


def test_files_and_subfolders_are_read(folders):
    media, _ = folders
    assert read((media / "x.png").as_uri(), media) == IMAGE
    assert read((media / "sub" / "deeper" / "y.png").as_uri(), media) == IMAGE + b" (deeper)"
    assert read(f"file://localhost{media}/./sub//deeper/y.png", media) == IMAGE + b" (deeper)"


def test_percent_escapes_are_decoded(folders):
    media, _ = folders
    (media / "a b%#?.png").write_bytes(IMAGE)
    assert read((media / "a b%#?.png").as_uri(), media) == IMAGE  # as_uri writes %20, %25, %23, %3F


def test_the_media_folder_may_live_under_a_symlink(folders, tmp_path):
    media, _ = folders
    (tmp_path / "link").symlink_to(media, target_is_directory=True)
    assert read((tmp_path / "link" / "x.png").as_uri(), tmp_path / "link") == IMAGE
    assert read((media / "x.png").as_uri(), tmp_path / "link") == IMAGE  # by its real path too


def test_links_inside_the_folder_are_refused(folders):
    media, outside = folders
    (media / "out.png").symlink_to(outside / "secret.png")
    (media / "in.png").symlink_to(media / "x.png")
    (media / "subs").symlink_to(media / "sub", target_is_directory=True)
    (media / "away").symlink_to(outside, target_is_directory=True)
    for name in ("out.png", "in.png", "subs/deeper/y.png", "away/secret.png"):
        assert "links inside the media folder are refused" in refused((media / name).as_uri(), media)


def test_dot_dot_and_outside_paths_are_refused(folders):
    media, outside = folders
    assert "'..'" in refused(f"file://{media}/../outside/secret.png", media)
    assert "'..'" in refused(f"file://{media}/sub/../x.png", media)
    assert "not a file inside the media folder" in refused((outside / "secret.png").as_uri(), media)
    assert "not a file inside the media folder" in refused(media.as_uri(), media)
    assert "not a file inside the media folder" in refused((media / "missing.png").as_uri(), media)
    assert "another host" in refused(f"file://example.com{media}/x.png", media)


def test_folders_fifos_and_large_files(folders):
    media, _ = folders
    assert "not a regular file" in refused((media / "sub").as_uri(), media)
    os.mkfifo(media / "pipe.png")  # O_NONBLOCK: refused at once, no writer needed
    assert "not a regular file" in refused((media / "pipe.png").as_uri(), media)
    (media / "big.png").write_bytes(b"\0" * (CAP + 1))
    assert "--max-image-bytes" in refused((media / "big.png").as_uri(), media, status=413)


@pytest.mark.parametrize("url", [
    "file:///media\0/x.png",  # a NUL byte, raw (Path.resolve raised ValueError: 500)
    "file:///media/x%00.png",  # and escaped
    "file:///" + "n" * 300 + ".png",  # ENAMETOOLONG
    "file://[media/x.png",  # urlsplit's ValueError
    "file:///media/x.png?size=2",
    "file:///media/%ff%fe.png",  # not UTF-8: a name that is not there
])
def test_malformed_file_urls_are_400(folders, url):
    media, _ = folders
    refused(url.replace("/media", str(media)), media)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EIO])
def test_os_errors_on_open_are_400(folders, monkeypatch, code):
    """What the OS may answer for a name (this suite runs as root in CI, so EACCES is injected)."""
    media, _ = folders
    real_open = os.open

    def failing(path, flags, *args, dir_fd=None, **kwargs):
        if dir_fd is not None:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args, **kwargs)

    folder = MediaDir(media)
    monkeypatch.setattr(media_module.os, "open", failing)
    with pytest.raises(ApiError) as caught:
        read_image_url((media / "x.png").as_uri(), "m", CAP, folder)
    assert caught.value.status == 400 and caught.value.code == "invalid_image_url"
    assert str(media / "x.png") in caught.value.message


def test_a_swap_between_check_and_open_reads_nothing_outside(folders, monkeypatch):
    """The file becomes a symlink to an outside file right before the last component is opened."""
    media, outside = folders
    real_open = os.open

    def swapping(path, flags, *args, dir_fd=None, **kwargs):
        if path == b"x.png":
            os.unlink(media / "x.png")
            os.symlink(outside / "secret.png", media / "x.png")
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    folder = MediaDir(media)
    monkeypatch.setattr(media_module.os, "open", swapping)
    with pytest.raises(ApiError) as caught:
        read_image_url((media / "x.png").as_uri(), "m", CAP, folder)
    assert "links inside the media folder are refused" in caught.value.message


# The writer: another process (a thread would mostly wait for the GIL), flipping x.png by rename between
# the image and a symlink to the outside file, so that the name always exists; bounded in time itself.
FLIPPER = """
import os, sys, time
media, outside, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
staged, target = os.path.join(media, "sub", "staged"), os.path.join(media, "x.png")
image = open(target, "rb").read()
end = time.monotonic() + seconds
print("flipping", flush=True)
while time.monotonic() < end:
    with open(staged, "wb") as f:
        f.write(image)
    os.replace(staged, target)
    os.symlink(os.path.join(outside, "secret.png"), staged)
    os.replace(staged, target)
"""


def test_a_writer_flipping_the_file_never_leaks_the_outside_file(folders):
    media, outside = folders
    folder, url = MediaDir(media), (media / "x.png").as_uri()
    writer = subprocess.Popen([sys.executable, "-c", FLIPPER, str(media), str(outside), str(SWAP_SECONDS)],
                              stdout=subprocess.PIPE, text=True)
    answers = {"image": 0, "refused": 0}
    try:
        assert writer.stdout.readline() == "flipping\n"
        deadline = time.monotonic() + SWAP_SECONDS
        for i in range(SWAP_ROUNDS):
            try:
                data = read_image_url(url, "m", CAP, folder)
            except ApiError as e:
                assert e.status == 400 and "links inside the media folder are refused" in e.message, e.message
                answers["refused"] += 1
            else:
                assert data == IMAGE, data
                answers["image"] += 1
            if time.monotonic() > deadline:
                break
            if i % PAUSE_EVERY == 0:
                time.sleep(PAUSE)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert sum(answers.values()) > 0, answers
