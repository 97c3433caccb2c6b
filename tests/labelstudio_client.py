"""Run by Label Studio's own Python (the venv label-studio and label-studio-sdk live in, apart from
the project's: label-studio-sdk pins numpy < 2.3) for tests/test_labelstudio.py: one step of the
check through label-studio-sdk, JSON in on argv, JSON out on stdout."""

import json
import sys

from label_studio_sdk import LabelStudio


def main() -> None:
    args = json.loads(sys.argv[1])
    ls = LabelStudio(base_url=args["url"], api_key=args["token"])
    if args["step"] == "import":
        project = ls.projects.create(title="regionclip", label_config=open(args["config"]).read())
        ls.projects.import_tasks(id=project.id, request=json.load(open(args["tasks"])))
        tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
        out = {"project": project.id, "tasks": [t.id for t in tasks],
               "predictions": [[p.dict() for p in ls.predictions.list(task=t.id)] for t in tasks]}
    elif args["step"] == "correct":  # people's annotations submitted through the API, then the project's JSON export
        for a in args["annotations"]:
            ls.annotations.create(id=a["task"], result=a["result"], was_cancelled=a["was_cancelled"])
        with open(args["export"], "wb") as f:
            for chunk in ls.projects.exports.download_sync(id=args["project"], export_type="JSON",
                                                           download_all_tasks=True):
                f.write(chunk)
        out = {"export": args["export"]}
    else:  # "backend": connect regionclip serve, ask Label Studio for a task's predictions
        ml = ls.ml.create(url=args["backend"], project=args["project"], title="regionclip serve")
        ls.actions.create(id="retrieve_tasks_predictions", project=args["project"],
                          selected_items={"all": False, "included": [args["task"]]})
        out = {"state": str(ml.state), "predictions": [p.dict() for p in ls.predictions.list(task=args["task"])]}
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
