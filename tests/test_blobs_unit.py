"""blobs.py: List Blobs answers parsed without the SDK's pager (names, prefixes, markers,
metadata, the next page's marker) and the query that asks for them."""

from __future__ import annotations

import email.utils
from urllib.parse import parse_qs

from azregfs.storage import blobs
from azregfs.storage.blobs import list_query, parse_list

ANSWER = b"""<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="https://acct.blob.core.windows.net/" ContainerName="c">
  <Prefix>docker/</Prefix><MaxResults>3</MaxResults><Delimiter>/</Delimiter>
  <Blobs>
    <Blob>
      <Name>docker/a</Name>
      <Properties>
        <Last-Modified>Tue, 01 Dec 2026 10:00:00 GMT</Last-Modified>
        <Etag>0x8DC0000000000A</Etag><Content-Length>1234</Content-Length>
        <Content-Type>application/vnd.oci.image.manifest.v1+json</Content-Type>
        <BlobType>BlockBlob</BlobType>
      </Properties>
      <Metadata><mode>640</mode><uid>1000</uid></Metadata>
    </Blob>
    <Blob>
      <Name Encoded="true">docker/odd%EF%BF%BEname</Name>
      <Properties><Content-Length>0</Content-Length><BlobType>AppendBlob</BlobType>
        <Content-Type /></Properties>
    </Blob>
    <Blob>
      <Name>docker/empty</Name>
      <Properties><Content-Length>0</Content-Length><Etag>0x1</Etag></Properties>
      <Metadata><hdi_isfolder>true</hdi_isfolder></Metadata>
    </Blob>
    <BlobPrefix><Name>docker/registry/</Name></BlobPrefix>
    <Blob><Properties><Content-Length>5</Content-Length></Properties></Blob>
  </Blobs>
  <NextMarker>2!76!MDAwMDE4IWRvY2tlci9lbXB0eQ--</NextMarker>
</EnumerationResults>"""


def test_a_page_gives_blobs_prefixes_and_the_next_marker() -> None:
    page = parse_list(ANSWER)
    assert [blob.name for blob in page.blobs] == ["docker/a", "docker/odd\ufffename",
                                                  "docker/empty"]
    first, odd, marker = page.blobs
    assert (first.size, first.etag, first.blob_type) == (1234, "0x8DC0000000000A", "BlockBlob")
    assert first.mtime == 1796119200.0  # 2026-12-01 10:00:00 UTC
    assert first.metadata == {"mode": "640", "uid": "1000"}
    assert first.content_type == "application/vnd.oci.image.manifest.v1+json"
    assert odd.is_append and odd.content_type is None and odd.metadata == {} and not odd.is_marker
    assert marker.is_marker
    assert page.prefixes == ["docker/registry/"]
    assert page.next_marker == "2!76!MDAwMDE4IWRvY2tlci9lbXB0eQ--"


def test_the_last_page_has_no_marker_and_an_empty_one_no_blobs() -> None:
    page = parse_list(b"<EnumerationResults><Blobs /><NextMarker /></EnumerationResults>")
    assert page.blobs == [] and page.prefixes == [] and page.next_marker is None


def test_the_query_encodes_prefix_and_marker() -> None:
    query = list_query("a b/&c=d/", "/", 5000, "2!76!x+y/=")
    fields = parse_qs(query, keep_blank_values=True)
    assert fields["restype"] == ["container"] and fields["comp"] == ["list"]
    assert fields["include"] == ["metadata"] and fields["maxresults"] == ["5000"]
    assert fields["prefix"] == ["a b/&c=d/"] and fields["delimiter"] == ["/"]
    assert fields["marker"] == ["2!76!x+y/="]
    assert "prefix" not in parse_qs(list_query("", None, 1, None))


def _page(blobs: list[str], tail: str = "") -> bytes:
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults><Blobs>"
            + "".join(blobs) + "</Blobs>" + tail + "</EnumerationResults>").encode()


TRICKY = _page([
    "<Blob><Name>a &amp; b &lt;c&gt; &#x00E9;</Name><Properties><Creation-Time>Tue, 01 Dec "
    "2026 09:00:00 GMT</Creation-Time><Last-Modified>Tue, 01 Dec 2026 10:00:00 GMT"
    "</Last-Modified><Etag>0x8DC</Etag><Content-Length>71</Content-Length><Content-Type>"
    "text/plain</Content-Type><Content-MD5>bLJY00HwGdpKLmdI3XSS+Q==</Content-MD5><BlobType>"
    "BlockBlob</BlobType></Properties><Metadata><mode>0644</mode><note>x &amp; y</note>"
    "<empty /><Etag>not the etag</Etag></Metadata><OrMetadata /></Blob>",
    "<Blob><Name Encoded=\"true\">odd%EF%BF%BEname</Name><Properties><Content-Length>0"
    "</Content-Length><Content-Type /><BlobType>AppendBlob</BlobType></Properties>"
    "<Metadata /></Blob>",
    "<BlobPrefix><Name>dir/</Name></BlobPrefix>",
    "<BlobPrefix><Name Encoded=\"true\">d%EF%BF%BEir/</Name></BlobPrefix>",
    "<Blob><Name>m</Name><Properties><Etag>0x1</Etag></Properties><Metadata><hdi_isfolder>"
    "true</hdi_isfolder><NextMarker>metadata, not the marker</NextMarker></Metadata></Blob>",
], "<NextMarker>2!76!real</NextMarker>")


def test_the_fast_reading_agrees_with_elementtree() -> None:
    from azregfs.storage.blobs import _scan_list, parse_list_tree

    fast = _scan_list(TRICKY)
    assert fast is not None  # read by the fast path, not handed to ElementTree
    assert fast == parse_list_tree(TRICKY)
    assert fast.blobs[0].name == "a & b <c> \u00e9" and fast.blobs[0].metadata == {
        "mode": "0644", "note": "x & y", "empty": "", "Etag": "not the etag"}
    assert fast.blobs[0].content_md5 is not None and fast.blobs[1].content_type is None
    assert fast.prefixes == ["dir/", "d\ufffeir/"] and fast.next_marker == "2!76!real"
    assert fast.blobs[2].is_marker


def test_an_answer_the_fast_reading_does_not_expect_goes_to_elementtree() -> None:
    from azregfs.storage.blobs import _scan_list

    assert _scan_list(ANSWER) is None  # a blob without a name
    # A metadata key named like the element that delimits blobs.
    odd = _page(["<Blob><Name>x</Name><Properties><Etag>0x1</Etag></Properties><Metadata>"
                 "<Blob>v</Blob></Metadata></Blob>"])
    assert _scan_list(odd) is None
    page = parse_list(odd)
    assert [blob.name for blob in page.blobs] == ["x"] and page.blobs[0].metadata == {
        "Blob": "v"}


def test_last_modified_is_read_by_position_as_the_email_parser_reads_it() -> None:
    """_mtime's fast reading of Azure's fixed RFC 1123 shape agrees with the email module's
    parser over a century of seconds; any other shape goes to that parser."""
    for seconds in range(0, 4_102_444_800, 9_876_543):  # 1970 to 2100, odd steps
        text = email.utils.formatdate(seconds, usegmt=True)
        assert blobs._mtime(text) == seconds, text
    assert blobs._mtime("Thu, 3 Dec 2026 22:41:52 GMT") == 1_796_337_712.0  # one-digit day
    assert blobs._mtime("Thu, 03 Dec 2026 22:41:52 +0000") == 1_796_337_712.0
    assert blobs._mtime("not a date") == 0.0
    assert blobs._mtime(None) == 0.0
