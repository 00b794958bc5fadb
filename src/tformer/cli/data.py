"""`tformer data`: fetch a public data set into tformer's cache."""

import sys

from tformer.cli.common import print_json
from tformer.qa.download import BASE_URL, VERSIONS, download_squad


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="download a data set (SQuAD) into the cache",
        description="Download SQuAD's train and dev files into tformer's cache "
        "($TFORMER_CACHE/squad, else ~/.cache/tformer/squad), checked as SQuAD JSON before "
        "they are kept; then 'tformer train --task qa --data squad' (or squad-2.0) trains "
        "on them. Without network access, pass your own copy to 'tformer train --task qa' "
        "with --train and --val instead.",
    )
    p.add_argument("dataset", choices=["squad"], help="the data set")
    p.add_argument("--version", default="1.1", choices=list(VERSIONS), help="SQuAD version")
    p.add_argument("--base-url", default=BASE_URL, help="where the files are served")
    p.add_argument("--json", action="store_true", help="end with one JSON line: the paths")
    p.set_defaults(run=run)


def run(args) -> None:
    paths = download_squad(args.version, args.base_url, progress=not args.json)
    if args.json:
        print_json({split: str(path) for split, path in paths.items()})
        return
    for split, path in paths.items():
        print(f"{split}: {path}", file=sys.stdout)
